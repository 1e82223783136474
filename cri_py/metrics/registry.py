"""The metric families cri-py exports, defined once for every layer to import.

Names follow Prometheus conventions: the `cri_py_` prefix, base units in the name
(`_seconds`, `_bytes`) and `_total` for counters. The default registry also carries
prometheus-client's process and platform collectors.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Histogram

GRPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

registry: CollectorRegistry = REGISTRY

grpc_request_duration = Histogram(
    "cri_py_grpc_request_duration_seconds",
    "Time spent serving CRI gRPC requests, by method and status code.",
    ["method", "code"],
    buckets=GRPC_BUCKETS,
    registry=registry,
)
