"""Pod CIDRs from the kubelet and the CNI config rendered from them."""

from __future__ import annotations

import json

import pytest

from cri_py.errors import FailedPrecondition, InvalidArgument
from cri_py.network.podcidr import CONFLIST_NAME, PodCidrs, parse_cidrs, render

TEMPLATE = """{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true,
   "ipam": {"type": "host-local", "ranges": ${POD_CIDR_RANGES}, "routes": ${ROUTES}}},
  {"type": "portmap", "capabilities": {"portMappings": true}}],
 "comment": "node range ${POD_CIDR}"}"""


def test_parse_normalizes_and_accepts_dual_stack():
    assert parse_cidrs("") == []
    assert parse_cidrs("10.244.3.7/24") == ["10.244.3.0/24"]
    assert parse_cidrs(" 10.244.3.0/24 , fd00:10:244:3::/64") == ["10.244.3.0/24", "fd00:10:244:3::/64"]


@pytest.mark.parametrize("bad", ["10.244.3.0/33", "not-a-cidr", "10.244.3.0/24,nope"])
def test_parse_refuses_what_is_not_a_cidr(bad):
    with pytest.raises(InvalidArgument):
        parse_cidrs(bad)


def test_render_fills_ranges_routes_and_the_first_cidr():
    conf = json.loads(render(TEMPLATE, ["10.244.3.0/24", "fd00:10:244:3::/64"]))
    ipam = conf["plugins"][0]["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.244.3.0/24"}], [{"subnet": "fd00:10:244:3::/64"}]]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    assert conf["comment"] == "node range 10.244.3.0/24"
    assert json.loads(render(TEMPLATE, ["10.1.0.0/16"]))["plugins"][0]["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}]


def test_update_writes_the_conflist_and_remembers_across_restarts(tmp_path):
    template = tmp_path / "template.json"
    template.write_text(TEMPLATE)
    conf_dir = tmp_path / "net.d"
    cidrs = PodCidrs(str(tmp_path / "root"), str(conf_dir), str(template))
    cidrs.update("")  # the kubelet's call before the node has a CIDR: nothing happens
    assert not conf_dir.exists() and cidrs.cidrs == []
    cidrs.update("10.244.3.0/24")
    written = json.loads((conf_dir / CONFLIST_NAME).read_text())
    assert written["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.3.0/24"}]]
    again = PodCidrs(str(tmp_path / "root"), str(conf_dir), str(template))
    assert again.cidrs == ["10.244.3.0/24"]


def test_bad_input_or_template_changes_nothing(tmp_path):
    conf_dir = tmp_path / "net.d"
    broken = tmp_path / "broken.json"
    broken.write_text('{"ranges": ${POD_CIDR_RANGES}')  # not JSON once filled in
    for template, value, error in (
        (str(tmp_path / "template.json"), "10.1.0.0/16", FailedPrecondition),  # no such file
        (str(broken), "10.1.0.0/16", FailedPrecondition),
        ("", "10.1.0.0/99", InvalidArgument),
    ):
        cidrs = PodCidrs(str(tmp_path / "root"), str(conf_dir), template)
        with pytest.raises(error):
            cidrs.update(value)
        assert cidrs.cidrs == [] and not conf_dir.exists() and not (tmp_path / "root").exists()


def test_without_a_template_cidrs_are_only_recorded(tmp_path):
    cidrs = PodCidrs(str(tmp_path / "root"), str(tmp_path / "net.d"), "")
    cidrs.update("10.244.3.0/24")
    assert cidrs.cidrs == ["10.244.3.0/24"] and not (tmp_path / "net.d").exists()
