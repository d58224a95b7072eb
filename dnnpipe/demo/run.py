"""The demo's steps: model -> profile -> plan -> partition -> deploy -> run -> report, on one machine.

Every artefact lands in one work directory, in the same layout the individual commands use, so each
step can be rerun alone (`--steps profile plan`) or by hand with the command the report lists.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import DnnpipeError
from ..jsonio import write_json
from .work import Work

PAPER_C = [1.0, 0.33, 0.21, 0.21]
PAPER_M = [8998.0, 1452.0, 562.0, 582.0]
PAPER_MODEL_MB = 88.57  # EfficientNetV2B0's total R in the paper's profile: the memories are for that size
LAN_MBPS = 1000.0  # each board on gigabit Ethernet: plans count the time to ship every cut
STEPS = ("model", "profile", "plan", "partition", "deploy", "run", "report")


@dataclass
class Options:
    model: str = "efficientnetv2b0"
    input_size: Optional[int] = None
    cluster: Optional[Path] = None
    num_inputs: int = 200
    samples: int = 32
    repeats: int = 20
    steps: tuple[str, ...] = STEPS
    commands: list[str] = field(default_factory=list)


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(work: Work, options: Options) -> None:
    for step in options.steps:
        began = time.perf_counter()
        say(f"\n== {step} ==")
        STEP_FUNCTIONS[step](work, options)
        say(f"({step}: {time.perf_counter() - began:.1f} s)")
    say(f"\nwork directory: {work.root}")


def step_model(work: Work, options: Options) -> None:
    from ..examples import make_dataset, make_model
    from ..partition.partitioner import load_keras_model

    if not work.model.exists():
        make_model(options.model, work.model, options.input_size)
        say(f"wrote {work.model}")
    else:
        say(f"using {work.model}")
    if not work.dataset.exists():
        shape = tuple(load_keras_model(work.model).inputs[0].shape[1:])
        make_dataset(work.dataset, shape, options.samples)
        say(f"wrote {work.dataset} ({options.samples} synthetic images {shape})")


def cluster(options: Options, model_mb: float) -> dict:
    """The paper's testbed speeds, memories scaled to this model as they were to EfficientNetV2B0, and
    gigabit links (the runtime on loopback does not emulate them; the plan avoids cuts too big to ship)."""
    if options.cluster is not None:
        data = json.loads(options.cluster.read_text())
        data = data.get("device_config", data)
        return {"N": len(data["C"]), **{k: data[k] for k in ("C", "M", "B") if k in data}}
    scale = model_mb / PAPER_MODEL_MB
    return {"N": 4, "C": PAPER_C, "M": [round(m * scale, 3) for m in PAPER_M], "B": [LAN_MBPS] * 4}


def step_profile(work: Work, options: Options) -> None:
    from ..partition.partitioner import load_keras_model
    from ..profile.profiler import config_from, describe, profile_keras_model, progress_line

    profile = profile_keras_model(load_keras_model(work.model), options.repeats, num_threads=1,
                                  progress=progress_line)
    write_json(work.config, config_from(profile, cluster(options, sum(profile.R))))
    say(describe(profile))
    say(f"wrote {work.config}")


def step_plan(work: Work, options: Options) -> None:
    from ..planfile import format_plan, write_plan
    from ..planner import plan

    if options.cluster is not None:  # a new cluster for the same profile: re-plan without re-profiling
        config = json.loads(work.config.read_text())
        config["device_config"] = cluster(options, sum(config["model_config"]["R"]))
        write_json(work.config, config)
    result = plan(work.config)
    write_plan(result, work.plan)
    say(format_plan(result))
    say(f"wrote {work.plan}")


def step_partition(work: Work, options: Options) -> None:
    from ..partition.partitioner import load_keras_model, partition_keras_model
    from ..planfile import read_stages

    model = load_keras_model(work.model)
    partition_keras_model(model, read_stages(work.plan), work.parts / work.name, work.name, str(work.plan))
    # The comparison: the whole model as one stage on the fastest device.
    config = json.loads(work.config.read_text())
    speeds, U = config["device_config"]["C"], config["model_config"]["U"]
    fastest = max(range(len(speeds)), key=lambda d: speeds[d]) + 1
    partition_keras_model(model, [[1, U, fastest]], work.single / work.name, work.name, "single device",
                          verify_chain=False)


def step_deploy(work: Work, options: Options) -> None:
    from ..deploy.deployer import DeployOptions, deploy
    from ..deploy.ship import format_reports
    from ..runtime.local import free_ports

    speeds = json.loads(work.config.read_text())["device_config"]["C"]
    ports = free_ports(len(speeds))
    devices = [{"device_id": d + 1, "host": "local", "remote_dir": str(work.devices / f"device_{d + 1}"),
                "runtime_port": ports[d]} for d in range(len(speeds))]
    write_json(work.registry, {"devices": devices})
    deployment = deploy(DeployOptions(registry=work.registry, model_name=work.name, model_path=work.parts,
                                      config=work.configs, dataset=work.dataset))
    say(format_reports(deployment.reports))
    if deployment.failed:
        raise DnnpipeError(f"deploying to {len(deployment.failed)} devices failed (see the table above)")


def emulation_scale(speeds: list[float], cores: int) -> float:
    """One factor for every emulated speed, so the emulated cluster fits this host.

    Every stage computes on this host and sleeps the rest of its emulated stage time, so a cluster
    with sum(C) = 1.75 would need 1.75 cores for compute alone and its stages would compete for
    them: the factor keeps it within half of the cores. Scaling every C alike leaves the plan and the
    speed-up unchanged and scales predicted times by 1/factor. (It is no larger a slow-down than
    needed: emulation multiplies the host's own timing noise by 1/C as well.)
    """
    return min(1.0, cores / 4 / sum(speeds))


def step_run(work: Work, options: Options) -> None:
    import os

    from ..config import load_config
    from ..runtime.local import RunOptions, run_local

    C = load_config(work.config).cluster.C
    scale = emulation_scale(list(C), os.cpu_count() or 1)
    speeds = [c * scale for c in C]
    run = RunOptions(num_inputs=options.num_inputs, num_threads=1)
    say(f"pipeline, each stage slowed to its device's speed C x {scale:.3g} (see emulation_scale):")
    pipeline = run_local(work.parts / work.name, work.dataset, work.results, work.logs / "pipeline", speeds, run)
    say(pipeline.describe())
    say("the fastest device alone:")
    single = run_local(work.single / work.name, work.dataset, None, work.logs / "single", speeds, run)
    say(single.describe())
    work.measured.write_text(json.dumps({
        "emulation_scale": scale, "pipeline_throughput": pipeline.throughput, "single_throughput": single.throughput,
        "latency_p50_ms": pipeline.stages[-1].latency_p50_ms, "latency_p95_ms": pipeline.stages[-1].latency_p95_ms,
        "single_latency_p50_ms": single.stages[-1].latency_p50_ms,
        "stage_time_p50_ms": [s.stage_time_p50_ms for s in pipeline.stages]}, indent=2) + "\n")


def step_report(work: Work, options: Options) -> None:
    from .report import write_report

    if not work.measured.exists():
        raise DnnpipeError(f"{work.measured} not found: run the 'run' step first")
    say(write_report(work))


STEP_FUNCTIONS = {"model": step_model, "profile": step_profile, "plan": step_plan, "partition": step_partition,
                  "deploy": step_deploy, "run": step_run, "report": step_report}
