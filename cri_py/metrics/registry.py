"""The metric families cri-py exports, defined once for every layer to import.

Names follow Prometheus conventions: the `cri_py_` prefix, base units in the name
(`_seconds`, `_bytes`) and `_total` for counters. The default registry also carries
prometheus-client's process and platform collectors.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cri_py.shim.logsink import read_counter
from cri_py.shim.protocol import LOG_BYTES_FILE

GRPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

registry: CollectorRegistry = REGISTRY

grpc_request_duration = Histogram(
    "cri_py_grpc_request_duration_seconds",
    "Time spent serving CRI gRPC requests, by method and status code.",
    ["method", "code"],
    buckets=GRPC_BUCKETS,
    registry=registry,
)

events_dropped = Counter(
    "cri_py_container_events_dropped_total",
    "Container events not delivered because a GetContainerEvents subscriber fell behind and was cut off.",
    registry=registry,
)

image_pulls = Counter(
    "cri_py_image_pulls_total", "PullImage calls by result (success or the gRPC code).", ["result"], registry=registry
)
image_pull_bytes = Counter(
    "cri_py_image_pull_bytes_total", "Compressed layer bytes of images pulled successfully.", registry=registry
)
image_pull_duration = Histogram(
    "cri_py_image_pull_duration_seconds",
    "Time to pull and unpack an image, by result.",
    ["result"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=registry,
)

cni_duration = Histogram(
    "cri_py_cni_operation_duration_seconds",
    "CNI plugin chain runs by operation (ADD, DEL) and result (success, failure).",
    ["operation", "result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=registry,
)

shim_starts = Counter(
    "cri_py_shim_starts_total", "Tasks created through a shim, by result (success, failure).", ["result"], registry=registry
)

oom_kills = Counter("cri_py_oom_kills_total", "Containers that ended OOM-killed.", registry=registry)


class StateGauges:
    """`cri_py_pods{state}` and `cri_py_containers{state}`, counted at scrape time.

    The daemon registers a function that returns the current counts; nothing is kept
    in step on every state change, so the gauges can never drift from the truth.
    """

    def __init__(self) -> None:
        self.counts: Any = None  # () -> (pods: dict[state, n], containers: dict[state, n])

    def collect(self) -> Any:
        pods = GaugeMetricFamily("cri_py_pods", "Pod sandboxes by state.", labels=["state"])
        containers = GaugeMetricFamily("cri_py_containers", "Containers by state.", labels=["state"])
        if self.counts is not None:
            pod_counts, container_counts = self.counts()
            for state, n in sorted(pod_counts.items()):
                pods.add_metric([state], n)
            for state, n in sorted(container_counts.items()):
                containers.add_metric([state], n)
        yield pods
        yield containers


state_gauges = StateGauges()
registry.register(state_gauges)


@contextlib.contextmanager
def timed(histogram: Histogram, **labels: str) -> Iterator[None]:
    """Observe the block's duration with result="success" or "failure"."""
    start = time.perf_counter()
    result = "failure"
    try:
        yield
        result = "success"
    finally:
        histogram.labels(**labels, result=result).observe(time.perf_counter() - start)


class LogBytes:
    """`cri_py_log_bytes_written_total`: bytes the shims wrote to container logs.

    Each shim counts its own in an mmap'ed file in its task dir; a scrape sums the
    live ones, and a task's final count moves into `retired` before its dir goes, so
    the counter never goes down.
    """

    def __init__(self) -> None:
        self.tasks_dir = ""
        self.retired = 0
        self._lock = threading.Lock()

    def retire(self, task_id: str) -> None:
        """Keep a task's count before its task dir (and counter file) is removed."""
        if self.tasks_dir:
            value = read_counter(os.path.join(self.tasks_dir, task_id, LOG_BYTES_FILE))
            with self._lock:
                self.retired += value

    def collect(self) -> Any:
        total = self.retired
        if self.tasks_dir and os.path.isdir(self.tasks_dir):
            for name in os.listdir(self.tasks_dir):
                total += read_counter(os.path.join(self.tasks_dir, name, LOG_BYTES_FILE))
        family = CounterMetricFamily(
            "cri_py_log_bytes_written", "Bytes the shims wrote to container log files.", unit=""
        )
        family.add_metric([], total)
        yield family


log_bytes = LogBytes()
registry.register(log_bytes)
