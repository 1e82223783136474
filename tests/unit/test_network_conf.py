"""CNI config discovery: first valid file in name order, readiness follows the dir."""

import json
import os

import pytest

from cri_py.network.conf import NetworkConfigSource, NetworkNotReady


@pytest.fixture
def dirs(tmp_path):
    conf = tmp_path / "net.d"
    bins = tmp_path / "bin"
    conf.mkdir()
    bins.mkdir()
    for name in ("bridge", "host-local", "portmap", "loopback"):
        path = bins / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return conf, bins


def _conflist(name="net", plugins=("bridge", "portmap")):
    return json.dumps({"cniVersion": "1.0.0", "name": name, "plugins": [{"type": p} for p in plugins]})


def test_empty_or_missing_dir_is_not_ready(dirs, tmp_path):
    conf, bins = dirs
    with pytest.raises(NetworkNotReady, match="no valid network config"):
        NetworkConfigSource(str(conf), [str(bins)]).get()
    with pytest.raises(NetworkNotReady):
        NetworkConfigSource(str(tmp_path / "absent"), [str(bins)]).get()


def test_config_appearing_later_is_seen_without_restart(dirs):
    conf, bins = dirs
    source = NetworkConfigSource(str(conf), [str(bins)])
    with pytest.raises(NetworkNotReady):
        source.get()
    (conf / "10-net.conflist").write_text(_conflist())
    assert source.get().name == "net"
    os.unlink(conf / "10-net.conflist")
    with pytest.raises(NetworkNotReady):
        source.get()


def test_first_valid_file_in_name_order_wins(dirs):
    conf, bins = dirs
    (conf / "05-broken.conflist").write_text("{not json")
    (conf / "10-b.conflist").write_text(_conflist("b"))
    (conf / "20-a.conflist").write_text(_conflist("a"))
    (conf / "00-ignored.txt").write_text(_conflist("txt"))
    net = NetworkConfigSource(str(conf), [str(bins)]).get()
    assert net.name == "b"
    assert net.source.endswith("10-b.conflist")


def test_single_plugin_conf_is_wrapped_as_conflist(dirs):
    conf, bins = dirs
    (conf / "10-one.conf").write_text(json.dumps({"cniVersion": "0.4.0", "name": "one", "type": "bridge"}))
    net = NetworkConfigSource(str(conf), [str(bins)]).get()
    assert [p["type"] for p in net.plugins] == ["bridge"]
    assert json.loads(net.conflist_bytes())["plugins"][0]["type"] == "bridge"


def test_missing_plugin_binary_is_named_and_recovers_when_installed(dirs):
    conf, bins = dirs
    (conf / "10-net.conflist").write_text(_conflist(plugins=("bridge", "flannel")))
    source = NetworkConfigSource(str(conf), [str(bins)])
    with pytest.raises(NetworkNotReady, match="plugin flannel not found"):
        source.get()
    (bins / "flannel").write_text("#!/bin/sh\n")
    (bins / "flannel").chmod(0o755)
    assert source.get().name == "net"


@pytest.mark.parametrize(
    "doc",
    [{"name": "x", "plugins": [{"type": "bridge"}]}, {"cniVersion": "1.0.0", "plugins": []}, [1, 2]],
)
def test_invalid_documents_are_skipped_with_reason(dirs, doc):
    conf, bins = dirs
    (conf / "10-bad.conflist").write_text(json.dumps(doc))
    with pytest.raises(NetworkNotReady, match="10-bad.conflist"):
        NetworkConfigSource(str(conf), [str(bins)]).get()
