"""The inference service: the pipeline behind the Open Inference Protocol (KServe v2 REST) with Prometheus
metrics (docs/service.md). Workstation side only: the device side never imports it."""

from .backend import SingleDevice
from .options import ServiceOptions
from .service import RunPipeline, Service, run_service

__all__ = ["RunPipeline", "Service", "ServiceOptions", "SingleDevice", "run_service"]
