"""The service's Prometheus metrics (names in docs/service.md), one registry per service, and the ServeEvents
the controller reports into them."""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
# fine around a pipeline's latency (tens to hundreds of ms), so a p99 can be read from the server's side too
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3,
                   0.4, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class ServiceMetrics:
    """Counters and gauges of one service; also its ServeEvents (dnnpipe.feeds): every call cheap, never
    raising. `up` is the pipeline's readiness as last reported."""

    def __init__(self, depth: Callable[[], float], inflight: Callable[[], float]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dnnpipe_requests", "Infer requests answered, by model and HTTP status",
                                ["model", "code"], registry=r)
        self.duration = Histogram("dnnpipe_request_duration_seconds", "Infer request time, arrival to answer",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.read_time = Histogram("dnnpipe_request_read_seconds",
                                   "Infer request's first byte to its last: the client sending it, and the copy",
                                   buckets=LATENCY_BUCKETS, registry=r)
        Gauge("dnnpipe_queue_depth", "Inputs accepted, not yet taken by the pipeline",
              registry=r).set_function(depth)
        Gauge("dnnpipe_inflight", "Inputs taken by the pipeline, result not yet delivered",
              registry=r).set_function(inflight)
        self.replans = Counter("dnnpipe_replans", "Re-plans of the running pipeline, by reason", ["reason"],
                               registry=r)
        self.recovery = Histogram("dnnpipe_recovery_seconds", "A fault's detection to the first new result",
                                  buckets=RECOVERY_BUCKETS, registry=r)
        self.stage = Gauge("dnnpipe_stage_seconds", "Last compute time of one frame on a stage, by stage and device",
                           ["stage", "device"], registry=r)
        self.devices = Gauge("dnnpipe_devices_up", "Devices up and serving", registry=r)
        self.ready_gauge = Gauge("dnnpipe_ready", "1 while every stage of the running plan is up", registry=r)
        self.ready_for_loss_gauge = Gauge("dnnpipe_ready_for_loss", "1 while the plan for the loss of any one "
                                          "device of the running plan is loaded ahead", registry=r)
        self._up = threading.Event()
        self._answered: dict[tuple[str, int], Counter] = {}

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def answered(self, model: str, code: int, seconds: float) -> None:
        counter = self._answered.get((model, code))
        if counter is None:  # labels() validates and locks: once per (model, status), not once per request
            counter = self._answered[(model, code)] = self.requests.labels(model=model, code=str(code))
        counter.inc()
        self.duration.observe(seconds)

    def received(self, seconds: float) -> None:
        self.read_time.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ServeEvents

    def ready(self, up: bool) -> None:
        (self._up.set if up else self._up.clear)()
        self.ready_gauge.set(1 if up else 0)

    def devices_up(self, count: int) -> None:
        self.devices.set(count)

    def replanned(self, reason: str) -> None:
        self.replans.labels(reason=reason).inc()

    def recovered(self, seconds: float) -> None:
        self.recovery.observe(seconds)

    def ready_for_loss(self, ready: bool) -> None:
        self.ready_for_loss_gauge.set(1 if ready else 0)

    def stage_time(self, stage: int, device: int, seconds: float) -> None:
        self.stage.labels(stage=str(stage), device=str(device)).set(seconds)
