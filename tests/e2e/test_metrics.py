"""A real Prometheus server scrapes cri-py: the target is up and cri-py's series are there."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
from cri_api.v1 import api_pb2 as cri

from tests.e2e.conftest import free_port, wait_for


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]["result"]
    except OSError:
        return []


@pytest.fixture
def prometheus(tmp_path):
    """Start Debian's prometheus on 127.0.0.1 with its own config and storage; stop it by PID."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run hack/install.sh")
    port = free_port()
    procs = []

    def start(target: str) -> int:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: cri-py\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
        )
        procs.append(proc)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_cri_py(server, prometheus):
    server.runtime().Version(cri.VersionRequest())
    port = prometheus(f"127.0.0.1:{server.metrics_port}")
    up = wait_for(lambda: [r for r in _query(port, 'up{job="cri-py"}') if r["value"][1] == "1"],
                  timeout=60, interval=0.5, what="prometheus to scrape cri-py")
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{server.metrics_port}"
    series = wait_for(lambda: _query(port, 'cri_py_grpc_request_duration_seconds_count{method="RuntimeService/Version"}'),
                      timeout=30, interval=0.5, what="a cri_py_ series")
    assert float(series[0]["value"][1]) >= 1
