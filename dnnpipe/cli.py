"""Every command of `python -m dnnpipe`: its name, help and where it lives (nothing else lives here).

Commands are registered by module name and imported only when chosen, so `python -m dnnpipe stage` (or any
device-side command) loads the device side alone, not the partitioner, deployer or TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

from .console import Command

AddArguments = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


@dataclass(frozen=True)
class Subcommand:
    module: str  # below dnnpipe, e.g. "runtime.command"
    add_arguments: str  # the module's function that adds the command's arguments to a parser
    run: str  # the module's function that runs the parsed arguments
    help: str

    def load(self) -> tuple[AddArguments, Command]:
        """Import the command's module (and only it): its argument adder and its run function."""
        module = importlib.import_module(f"dnnpipe.{self.module}")
        return getattr(module, self.add_arguments), getattr(module, self.run)


SUBCOMMANDS: dict[str, Subcommand] = {
    "partition": Subcommand("partition.command", "add_partitioner_arguments", "partition_command",
                            "plan a model's pipeline and cut it into TFLite sub-models (model_partitioner.py)"),
    "deploy": Subcommand("deploy.command", "add_deployer_arguments", "deploy_command",
                         "ship the stages to their devices (deployer.py)"),
    "replan": Subcommand("replan.command", "add_replan_arguments", "replan_command",
                         "re-plan a running pipeline after devices left, slowed down or lost memory"),
    "stage": Subcommand("runtime.command", "add_stage_arguments", "stage_command",
                        "run one pipeline stage (runtime_engine.py)"),
    "agent": Subcommand("runtime.command", "add_agent_arguments", "agent_command",
                        "a device agent: runs the stage roles serve gives it"),
    "run-local": Subcommand("testbed.command", "add_run_local_arguments", "run_local_command",
                            "run every stage of a partitioned model as its own process on loopback ports"),
    "testbed": Subcommand("testbed.command", "add_testbed_arguments", "testbed_command",
                          "a virtual fleet on this host: emulated boards (CPU quota, memory limit, shaped link) over "
                          "ssh"),
    "serve": Subcommand("serve.command", "add_serve_arguments", "serve_command",
                        "run a pipeline that re-plans while running: devices may leave, freeze, slow down or join"),
    "profile": Subcommand("profile.command", "add_profile_arguments", "profile_command",
                          "measure each unit's time and memory on this machine and write the config"),
    "demo": Subcommand("demo.command", "add_demo_arguments", "demo_command",
                       "the whole job on this machine: model, profile, plan, partition, deploy, run, report"),
    "slice": Subcommand("slicing.command", "add_slice_arguments", "slice_command",
                        "cut the sub-models of a new plan from the stored whole model.tflite, without TensorFlow"),
    "service": Subcommand("service.command", "add_service_arguments", "service_command",
                          "serve a partitioned model on this machine over the Open Inference Protocol (HTTP, the "
                          "baseline)"),
    "make-model": Subcommand("partition.command", "add_make_model_arguments", "make_model_command",
                             "write an example Keras model (weights=None, fixed seed) and optionally a synthetic "
                             "dataset"),
}
