"""The demo's steps: model -> profile -> plan -> partition -> deploy -> run -> report, on one machine.

Every artefact lands in one work directory, in the same layout the individual commands use, so each
step can be rerun alone (`--steps profile plan`) or by hand with the command the report lists.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import load_devices
from ..errors import DnnpipeError
from ..jsonio import write_json
from .cluster import cluster
from .work import Work

STEPS = ("model", "profile", "plan", "partition", "deploy", "run", "report")
COMPUTE = ("pace", "cpu-quota")  # each stage paced to its planned time on the host, or the virtual fleet


@dataclass
class Options:
    model: str = "efficientnetv2b0"
    input_size: Optional[int] = None
    cluster: Optional[Path] = None
    num_inputs: int = 200
    samples: int = 32
    repeats: int = 20
    steps: tuple[str, ...] = STEPS
    testbed: str = "auto"  # dnnpipe.testbed.netns.MODES
    scale: Optional[float] = None  # every emulated speed and bandwidth x this (default: fit the usable cores)
    compute: str = "pace"  # COMPUTE
    tls: bool = True  # stage links inside mutual TLS (off: --no-tls, to measure what TLS costs a board)


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(work: Work, options: Options) -> None:
    check_inputs(work, options)
    for step in options.steps:
        began = time.perf_counter()
        say(f"\n== {step} ==")
        STEP_FUNCTIONS[step](work, options)
        say(f"({step}: {time.perf_counter() - began:.1f} s)")
    say(f"\nwork directory: {work.root}")


def check_inputs(work: Work, options: Options) -> None:
    """Every input and every artefact a step needs, before the first step builds or measures anything."""
    if options.cluster is not None:
        load_devices(options.cluster)
    if work.root.exists() and not work.root.is_dir():
        raise DnnpipeError(f"{work.root}: --work-dir is a file, not a folder")
    for k, step in enumerate(options.steps):
        for needed, maker in NEEDS[step]:
            path = getattr(work, needed)
            if maker not in options.steps[:k] and not path.exists():
                raise DnnpipeError(f"the {step} step needs {path}, which the {maker} step makes: add {maker} to "
                                   f"--steps (or run without --steps)")


def step_model(work: Work, options: Options) -> None:
    from ..examples import make_dataset, make_model
    from ..partition.load import load_keras_model

    if not work.model.exists():
        make_model(options.model, work.model, options.input_size)
        say(f"wrote {work.model}")
    else:
        say(f"using {work.model}")
    if not work.dataset.exists():
        shape = tuple(load_keras_model(work.model).inputs[0].shape[1:])
        make_dataset(work.dataset, shape, options.samples)
        say(f"wrote {work.dataset} ({options.samples} synthetic images {shape})")


def step_profile(work: Work, options: Options) -> None:
    from ..partition.load import load_keras_model
    from ..profile.costs import describe
    from ..profile.profiler import keras_config, profile_keras_model, progress_line

    model = load_keras_model(work.model)
    if options.compute == "cpu-quota":
        from .fleet import profile_on_fleet

        profile_on_fleet(work, options, model, say)
        return
    profile = profile_keras_model(model, options.repeats, num_threads=1, progress=progress_line)
    write_json(work.config, keras_config(model, profile, cluster(options.cluster, sum(profile.R))))
    say(describe(profile))
    say(f"wrote {work.config}")


def step_plan(work: Work, options: Options) -> None:
    from ..planfile import format_plan, write_plan
    from ..planner import plan

    if options.cluster is not None and options.compute == "pace":  # a new cluster, the same profile: re-plan
        config = json.loads(work.config.read_text())
        config["device_config"] = cluster(options.cluster, sum(config["model_config"]["R"]))
        write_json(work.config, config)
    result = plan(work.config)
    write_plan(result, work.plan)
    say(format_plan(result))
    say(f"wrote {work.plan}")


def step_partition(work: Work, options: Options) -> None:
    from ..config import load_config
    from ..partition.partitioner import load_keras_model, partition_keras_model
    from ..planfile import read_stages
    from ..testbed.pacing import fastest_device

    model = load_keras_model(work.model)
    partition_keras_model(model, read_stages(work.plan), work.parts / work.name, work.name, str(work.plan))
    # The comparison: the whole model as one stage on the fastest device.
    config = load_config(work.config)
    partition_keras_model(model, [[1, config.profile.U, fastest_device(config)]], work.single / work.name,
                          work.name, "single device", verify_chain=False)


def step_deploy(work: Work, options: Options) -> None:
    from ..deploy.deployer import DeployOptions, deploy
    from ..deploy.ship import format_reports
    from ..testbed.local import free_ports

    if options.compute == "cpu-quota":
        from .fleet import deploy_to_fleet

        deploy_to_fleet(work, options, say)
        return
    speeds = json.loads(work.config.read_text())["device_config"]["C"]
    ports = free_ports(len(speeds))
    devices = [{"device_id": d + 1, "host": "local", "remote_dir": str(work.devices / f"device_{d + 1}"),
                "runtime_port": ports[d]} for d in range(len(speeds))]
    write_json(work.registry, {"devices": devices})
    deployment = deploy(DeployOptions(registry=work.registry, model_name=work.name, model_path=work.parts,
                                      config=work.configs, dataset=work.dataset, tls=options.tls))
    say(format_reports(deployment.reports))
    if deployment.failed:
        raise DnnpipeError(f"deploying to {len(deployment.failed)} devices failed (see the table above)")


def step_run(work: Work, options: Options) -> None:
    """The pipeline and the fastest device alone, each stage paced to its device's planned time on the testbed.

    Which runs and how fast their source offers inputs is demo.runs' (throughput unpaced, latency below
    saturation), the same for the fleet; here the devices are emulated by pacing each stage on this host.
    """
    from ..config import load_config
    from ..planfile import read_stages
    from ..testbed.local import run_local
    from ..testbed.cores import usable_cores
    from ..testbed.netns import open_testbed
    from ..testbed.pacing import emulation, emulation_scale, fastest_device
    from .report import measured
    from .runs import demo_runs, measure

    if options.compute == "cpu-quota":
        from .fleet import run_on_fleet

        run_on_fleet(work, options, say)
        return
    config = load_config(work.config)
    cores = usable_cores()
    scale = options.scale or emulation_scale(config, cores)
    pipeline_plan = emulation(config, read_stages(work.plan), scale)
    single_plan = emulation(config, [[1, config.profile.U, fastest_device(config)]], scale)
    devices = sorted({*pipeline_plan.devices, *single_plan.devices})
    links = None if pipeline_plan.link_mbps is None else {d: pipeline_plan.link_mbps[d - 1] for d in devices}
    say(f"emulated cluster: every speed and bandwidth x {scale:.3g}" + (
        "" if options.scale else f", to fit {cores:g} usable cores (see dnnpipe.testbed.pacing.emulation_scale)"))
    runs = demo_runs(pipeline_plan, single_plan, options.num_inputs, options.tls)
    with open_testbed(devices, links, options.testbed, say) as bed:
        done = measure(runs, lambda r: run_local(r.folder(work), work.dataset, r.output(work), work.logs / r.name,
                                                 r.emulated.pace_ms(), r.run, bed), say)
    write_json(work.measured, measured(work, runs, done, compute="pace", tls=options.tls, profile="host",
                                       testbed=done["pipeline"].network, usable_cores=cores, emulation_scale=scale))


def step_report(work: Work, options: Options) -> None:
    from .report import write_report

    say(write_report(work))


# What each step reads (a Work attribute) and the step that makes it.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "model": (), "profile": (("model", "model"),), "plan": (("config", "profile"),),
    "partition": (("model", "model"), ("plan", "plan")),
    "deploy": (("config", "profile"), ("dataset", "model"), ("parts", "partition")),
    "run": (("config", "profile"), ("plan", "plan"), ("dataset", "model"), ("parts", "partition"),
            ("single", "partition")),
    "report": (("config", "profile"), ("plan", "plan"), ("measured", "run"))}

STEP_FUNCTIONS = {"model": step_model, "profile": step_profile, "plan": step_plan, "partition": step_partition,
                  "deploy": step_deploy, "run": step_run, "report": step_report}
