"""The Prometheus /metrics endpoint, served by prometheus-client's own HTTP thread.

Scrapes then never wait on the daemon's event loop, and a busy loop never makes a
scrape time out.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import start_http_server

from cri_py.metrics.registry import registry

log = logging.getLogger(__name__)


def split_host_port(address: str) -> tuple[str, int]:
    """`127.0.0.1:9127` or `[::1]:9127` to (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """Starts and stops the endpoint; an empty address means no endpoint."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._httpd: Any = None
        self._thread: Any = None

    def start(self) -> None:
        """Bind and serve in a daemon thread; a bind failure is raised to the caller."""
        if not self.address:
            return
        host, port = split_host_port(self.address)
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        log.info("metrics endpoint listening on http://%s/metrics", self.address)

    def stop(self) -> None:
        """Close the listener and wait for its thread."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None
