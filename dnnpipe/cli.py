"""Every command of `python -m dnnpipe`, assembled from the areas' command modules (nothing else lives here)."""

from __future__ import annotations

import argparse
from typing import Callable

from .console import Command
from .demo.command import add_demo_arguments, demo_command
from .deploy.command import add_deployer_arguments, deploy_command
from .partition.command import add_make_model_arguments, add_partitioner_arguments, make_model_command, \
    partition_command
from .planning.command import add_replan_arguments, replan_command
from .profile.command import add_profile_arguments, profile_command
from .runtime.command import add_agent_arguments, add_stage_arguments, agent_command, stage_command
from .slicing.command import add_slice_arguments, slice_command
from .testbed.command import add_run_local_arguments, run_local_command
from .serve.command import add_serve_arguments, serve_command

AddArguments = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]

SUBCOMMANDS: dict[str, tuple[AddArguments, Command, str]] = {
    "partition": (add_partitioner_arguments, partition_command,
                  "plan a model's pipeline and cut it into TFLite sub-models (model_partitioner.py)"),
    "deploy": (add_deployer_arguments, deploy_command, "ship the stages to their devices (deployer.py)"),
    "replan": (add_replan_arguments, replan_command,
               "re-plan a running pipeline after devices left, slowed down or lost memory"),
    "stage": (add_stage_arguments, stage_command, "run one pipeline stage (runtime_engine.py)"),
    "agent": (add_agent_arguments, agent_command, "a device agent: runs the stage roles serve gives it"),
    "run-local": (add_run_local_arguments, run_local_command,
                  "run every stage of a partitioned model as its own process on loopback ports"),
    "serve": (add_serve_arguments, serve_command,
              "run a pipeline that re-plans while running: devices may leave, freeze, slow down or join"),
    "profile": (add_profile_arguments, profile_command,
                "measure each unit's time and memory on this machine and write the config"),
    "demo": (add_demo_arguments, demo_command,
             "the whole job on this machine: model, profile, plan, partition, deploy, run, report"),
    "slice": (add_slice_arguments, slice_command,
              "cut the sub-models of a new plan from the stored whole model.tflite, without TensorFlow"),
    "make-model": (add_make_model_arguments, make_model_command,
                   "write an example Keras model (weights=None, fixed seed) and optionally a synthetic dataset"),
}
