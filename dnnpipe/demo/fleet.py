"""The demo on the virtual fleet (`--compute cpu-quota`): emulated boards really slower (a CPU quota each) and
really smaller (a memory limit), reached over ssh as boards are; no stage is paced to the plan.

The fleet lives in the work directory (`fleet/`, its registry in configurations/); each step that needs it
brings it up when it is not, and the run step takes it down when done. Every device's unit times are measured
on the device (per-device profiling), so the plan and its prediction are the fleet's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..deploy.registry import Device, load_registry
from ..deploy.transport import RUN, SshOptions, SshTransport
from ..errors import DnnpipeError
from ..testbed import cgroups, fleet
from .cluster import cluster
from .work import Work

SSH = SshOptions(connect_timeout=10.0)


def state(work: Work) -> Path:
    return work.root / "fleet"


def matches(shape: fleet.Fleet, cluster: dict[str, Any], scale: Optional[float],
            runtime_mb: float = fleet.RUNTIME_MB) -> bool:
    """Whether a running fleet emulates this cluster: every device's C, M and B, the runtime's memory on top of
    M and (when given) the scale; a fleet kept for C alone would run with stale memory and link limits (pure)."""
    want = fleet.describe(cluster, Path(shape.state), shape.subnet, scale or shape.scale, shape.user, shape.python,
                          pin=False, runtime_mb=runtime_mb)

    def limits(f: fleet.Fleet) -> list[tuple]:
        return [(d.C, d.M, d.link_mbps, d.memory_mb) for d in f.devices]

    return (scale is None or scale == shape.scale) and limits(want) == limits(shape)


def ensure_fleet(work: Work, cluster: dict[str, Any], scale: Optional[float], say=print) -> fleet.Fleet:
    """The work directory's fleet, brought up for this cluster when it is not up already."""
    try:
        shape, rows = fleet.status(state(work))
        if matches(shape, cluster, scale) and work.registry.is_file() and all(r["state"] == "up" for r in rows):
            return shape
    except DnnpipeError:
        pass
    cluster_file = work.root / "fleet_cluster.json"
    cluster_file.parent.mkdir(parents=True, exist_ok=True)
    cluster_file.write_text(json.dumps({k: cluster[k] for k in ("C", "M", "B") if k in cluster}))
    shape = fleet.up(cluster_file, work.registry, state(work), scale, echo=say)
    say(fleet.format_status(*fleet.status(state(work))))
    return shape


def fleet_links(config: dict[str, Any], shape: fleet.Fleet) -> dict[str, Any]:
    """The config's links as the fleet shapes them (B x the fleet's scale): the plan is the fleet's."""
    if "B" not in config["device_config"]:
        return config
    links = [d.link_mbps for d in shape.devices]
    return {**config, "device_config": {**config["device_config"], "B": links}}


@dataclass
class FleetNetwork:
    """run_local's Network on the fleet: each stage started over ssh on its board, from the files the deployer
    put there (runtime_engine.py and the board's sub-models), listening on the board's own address."""

    devices: dict[int, Device]
    kind: str = "fleet"

    def address(self, device: int) -> str:
        return self.devices[device].host

    def port(self, stage: int) -> int:
        return fleet.RUNTIME_PORT

    def command(self, device: int, argv: Sequence[str]) -> list[str]:
        """`python -m dnnpipe stage ARGS` as `python runtime_engine.py ARGS` in the board's folder, its models
        from the board's own copy (the folder named as the deployer names it); logs, inputs and results on the
        host's paths, which the emulated boards share."""
        d = self.devices[device]
        args = list(argv[4:])  # after python -m dnnpipe stage
        at = args.index("--model-path") + 1
        args[at] = Path(args[at]).resolve().name
        command = SshTransport(d, SSH).argv(RUN, d.interpreter, "runtime_engine.py", *args)
        return [command[0], "-n", *command[1:]]  # stdin from /dev/null: ssh never reads this terminal


def network(work: Work) -> FleetNetwork:
    return FleetNetwork(load_registry(work.registry))


def throttling(shape: fleet.Fleet) -> dict[int, dict[str, float]]:
    return {d.device_id: cgroups.stats(shape.fleet_id, d.device_id) for d in shape.devices}


def throttled_between(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]],
                      devices: Sequence[int]) -> list[dict[str, float]]:
    """Per device of a run: quota periods, how many held it back and for how long (cgroup cpu.stat deltas)."""
    return [{"device": d, **{k: after[d][k] - before[d][k] for k in ("nr_periods", "nr_throttled", "throttled_s")},
             "oom_kills": after[d]["oom_kills"]} for d in devices]


def demo_cluster(work: Work, options) -> dict[str, Any]:
    """The cluster the fleet emulates: the demo's (--cluster or the paper-like one), for the model's memory."""

    config = json.loads(work.config.read_text())
    return cluster(options.cluster, sum(config["model_config"]["R"]))


def profile_on_fleet(work: Work, options, model, say=print) -> None:
    """The host's profile (memory, cut sizes, legal cuts), then every unit timed on every board: E_device and C."""
    from ..jsonio import write_json
    from ..profile.costs import describe
    from ..profile.devices import DeviceProfileOptions, format_outcomes, link_costs, on_devices
    from ..profile.profiler import keras_config, profile_keras_model, profiling_model, progress_line

    converted = profiling_model(model, progress_line)
    profile = profile_keras_model(model, options.repeats, num_threads=1, progress=progress_line, converted=converted)
    say(describe(profile))
    config = keras_config(model, profile, cluster(options.cluster, sum(profile.R)))
    shape = ensure_fleet(work, config["device_config"], options.scale, say)
    config, outcomes = on_devices(fleet_links(config, shape), converted.flatbuffer, work.registry,
                                  DeviceProfileOptions(repeats=options.repeats, num_threads=1, ssh=SSH,
                                                       tls=options.tls), say)
    say(format_outcomes(outcomes))
    for o, board in zip(sorted(outcomes, key=lambda o: o.device.device_id), shape.devices):
        if o.times is not None and o.times.cpu_share is not None:
            say(f"board {board.device_id}: the timer got {o.times.cpu_share:.3f} cores of its quota "
                f"{board.cpu_cores:.3f} ({o.times.cpu_share / board.cpu_cores:.0%}; under 100%: the host or "
                f"something else on the board took the rest)")
    say(f"per-device profile: C = {config['device_config']['C']} (each board's whole model against board 1's)")
    if "link_cpu" in config["device_config"]:
        say(f"link CPU per board (ms per MB sent, received; ms per frame), which the planner and the prediction "
            f"count and the paper's model does not: {json.dumps(config['device_config']['link_cpu'])}")
    write_json(work.config, config)
    say(f"wrote {work.config}")
    costs = link_costs(outcomes)
    if costs is not None:
        write_json(work.link_costs, costs)
        say(f"wrote {work.link_costs}: how each board's link CPU was measured (TLS: {all(c['tls'] for c in costs)}, "
            f"the timer's share of its quota), for the report")


def deploy_to_fleet(work: Work, options, say=print) -> None:
    """The pipeline's stages, and the whole model for the fastest board alone, shipped over ssh."""
    from ..deploy.deployer import DeployOptions, deploy
    from ..deploy.ship import format_reports

    ensure_fleet(work, demo_cluster(work, options), options.scale, say)
    for folder in (work.parts, work.single):
        deployment = deploy(DeployOptions(registry=work.registry, model_name=work.name, model_path=folder,
                                          config=work.configs, ssh=SSH, tls=options.tls))
        say(format_reports(deployment.reports))
        if deployment.failed:
            raise DnnpipeError(f"deploying to {len(deployment.failed)} boards failed (see the table above)")


def profile_shares(work: Work) -> Optional[list[Any]]:
    """The cores each board gave the timer while profiled (link_costs.json), for the report."""
    if not work.link_costs.is_file():
        return None
    return [r.get("cpu_share") for r in sorted(json.loads(work.link_costs.read_text()), key=lambda r: r["device"])]


def run_on_fleet(work: Work, options, say=print) -> None:
    """demo.runs' runs (the pipeline and the fastest board alone unpaced, the pipeline for latency), each stage on
    its board over ssh, no pacing: the boards' quotas make them as slow as they are. The fleet is taken down
    afterwards."""
    from ..config import load_config
    from ..jsonio import write_json
    from ..planfile import read_stages
    from ..testbed.local import PipelineRun, run_local
    from ..testbed.cores import usable_cores
    from ..testbed.pacing import emulation, fastest_device
    from .report import measured
    from .runs import DemoRun, demo_runs, measure

    config = load_config(work.config)
    if config.profile.E_device is None:
        raise DnnpipeError(f"{work.config} has no per-device profile: run the profile step with --compute cpu-quota")
    shape = ensure_fleet(work, demo_cluster(work, options), options.scale, say)
    links = config.cluster.link_cpu
    if links is None:
        say(f"{work.config} has no link CPU (device_config.link_cpu; profile again): the plan and the prediction are "
            f"the paper's, links cost no CPU")
    pipeline_plan = emulation(config, read_stages(work.plan), 1.0)
    single_plan = emulation(config, [[1, config.profile.U, fastest_device(config)]], 1.0)
    say(f"predicted: pipeline {pipeline_plan.throughput:.1f} inferences/s counting each board's measured link CPU "
        f"(the paper's model, links without CPU: {pipeline_plan.paper_throughput:.1f}); fastest board alone "
        f"{single_plan.throughput:.1f}")
    net = network(work)
    throttled: dict[str, list[dict[str, float]]] = {}

    def on_fleet(r: DemoRun) -> PipelineRun:
        before = throttling(shape)
        try:
            done = run_local(r.folder(work), work.dataset.resolve(),  # paths the boards share with the host
                             r.output(work).resolve(), (work.logs / r.name).resolve(), None, r.run, net)
        finally:
            fleet.stop_programs(shape)
        throttled[r.name] = throttled_between(before, throttling(shape), r.emulated.devices)
        return done

    runs = demo_runs(pipeline_plan, single_plan, options.num_inputs, options.tls)
    try:
        done = measure(runs, on_fleet, say)
    finally:
        fleet.down(state(work))
        say(f"fleet {shape.fleet_id} taken down")
    write_json(work.measured, measured(
        work, runs, done, compute="cpu-quota", profile="per-device", tls=options.tls,
        testbed="fleet", usable_cores=usable_cores(), emulation_scale=shape.scale,
        paper_predicted_pipeline_throughput=pipeline_plan.paper_throughput,
        paper_predicted_single_throughput=single_plan.paper_throughput,
        link_costs=None if links is None else [
            {"device": d + 1, **{key: values[d] for key, values in links.to_dict().items()}}
            for d in range(config.cluster.N)], profile_cpu_share=profile_shares(work),
        throttling=throttled,
        fleet=[{"device": d.device_id, "C": d.C, "cpu_cores": d.cpu_cores, "cpus": d.cpus, "memory_mb": d.memory_mb,
                "link_mbps": d.link_mbps} for d in shape.devices]))
