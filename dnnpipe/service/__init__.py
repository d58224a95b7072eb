"""The inference service: the pipeline behind the Open Inference Protocol (KServe v2 REST) with Prometheus
metrics (docs/service.md). Workstation side only: the device side never imports it.
Empty on purpose: importing the package loads neither the interpreter nor prometheus_client (import the module
you need: service.service, service.backend, service.options).
"""
