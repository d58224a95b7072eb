"""The demo's report: predicted against measured, as Markdown with a timeline and a stage-time chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import load_config
from ..runtime.metrics import FrameTiming, read_timings
from ..testbed.local import PipelineRun
from ..testbed.pacing import Emulation
from .runs import DemoRun, how_measured
from .work import Work


QUOTA_USED = 0.95  # a board that used this share of its quota or more was given it (CPU-time accounting is coarse)


def _p50(values: list[float]) -> Optional[float]:
    return float(np.percentile(values, 50)) if values else None


def breakdown(log_dir: Path, stages: int) -> list[dict[str, Any]]:
    """Where each stage's time went, p50 per frame: host compute, pacing (waiting out the device's planned
    time), transfer to the next stage (send start to fully received; one clock, all stages on one host) and
    queueing (waiting for the executor, then for the sender), and the frames the host could not pace."""
    timings = [read_timings(log_dir, k) for k in range(1, stages + 1)]
    rows = []
    for k, rows_k in enumerate(timings):
        received = {t.sequence: t.received for t in timings[k + 1]} if k + 1 < stages else {}
        rows.append({
            "stage": k + 1, "frames": len(rows_k), "planned_ms": rows_k[0].planned_ms if rows_k else 0.0,
            "host_compute_p50_ms": _p50([t.inference_ms for t in rows_k]),
            "host_compute_p95_ms": float(np.percentile([t.inference_ms for t in rows_k], 95)) if rows_k else None,
            "pacing_p50_ms": _p50([t.emulation_ms for t in rows_k]),
            "transfer_p50_ms": _p50([(received[t.sequence] - t.send_start) * 1000 for t in rows_k
                                     if t.sequence in received]),
            "queueing_p50_ms": _p50([t.queue_wait_ms + _outbox_ms(t) for t in rows_k]),
            "overruns": sum(t.overrun for t in rows_k),
            "overrun_frames": [t.sequence for t in rows_k if t.overrun]})
    return rows


def measured(work: Work, runs: list[DemoRun], done: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """measured.json's common keys from a demo's runs (demo.runs: pipeline and single unpaced, latency paced below
    saturation) and their results (testbed.local's), whatever emulated the devices; `extra` adds the testbed's own."""
    plans = {r.name: r for r in runs}
    pipeline, single, latency = done["pipeline"], done["single"], done["latency"]
    pipeline_plan, how = plans["pipeline"].emulated, how_measured(runs, done)
    return {
        **extra,
        "pipeline_throughput": pipeline.throughput, "predicted_pipeline_throughput": pipeline_plan.throughput,
        "single_throughput": single.throughput,
        "predicted_single_throughput": plans["single"].emulated.throughput,
        "latency_p50_ms": latency.stages[-1].latency_p50_ms, "latency_p95_ms": latency.stages[-1].latency_p95_ms,
        "latency_rate": how["latency"]["source_fps"], "latency_load": how["latency"]["load"],
        "latency_run_throughput": latency.throughput, "runs": how,
        "planned_hop_ms": [s.hop_ms for s in pipeline_plan.stages],
        "stage_time_p50_ms": [s.stage_time_p50_ms for s in pipeline.stages],
        "stages": breakdown(work.logs / "pipeline", len(pipeline.stages)),
        "single_stages": breakdown(work.logs / "single", 1),
        "spent": {"pipeline": spent(pipeline_plan, pipeline), "single": spent(plans["single"].emulated, single)}}


def spent(plan: Emulation, run: PipelineRun) -> list[dict[str, Any]]:
    """Each stage's device, its planned ms a frame on the device's clock (compute; CPU on its links and frames) and
    what its process spent: CPU a frame, of it the inference, and about the cores it used (CPU a frame x its
    steady rate; the CPU includes the stage's start, so a busy stage may come out a little over its quota)."""
    return [{"device": p.device, "planned_compute_ms": p.compute_ms, "planned_link_cpu_ms": p.link_cpu_ms,
             "planned_period_ms": p.period_ms,
             "cpu_ms_per_frame": s.cpu_ms_per_frame,  # the process's, every thread
             "inference_cpu_ms": s.inference_cpu_ms,
             "cores_used": None if s.cpu_ms_per_frame is None else s.cpu_ms_per_frame * s.throughput / 1000}
            for p, s in zip(plan.stages, run.stages)]


def _outbox_ms(t: FrameTiming) -> float:
    return max(0.0, (t.send_start - t.infer_end) * 1000) if t.send_start else 0.0


def _plot_timeline(log_dir: Path, stages: int, path: Path, frames: int = 12) -> None:
    """Every stage's busy intervals (host compute plus pacing) in one window of steady state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timings = [read_timings(log_dir, k) for k in range(1, stages + 1)]
    # Steady state: after the last stage got going, before the first ran out of inputs.
    steady_from, steady_to = timings[-1][0].infer_start, timings[0][-1].infer_end
    period = (timings[-1][-1].infer_end - timings[-1][0].infer_end) / max(1, len(timings[-1]) - 1)
    middle = ((steady_from + steady_to) / 2 if steady_to > steady_from
              else timings[-1][len(timings[-1]) // 2].infer_start)
    begin, end = middle - frames * period / 2, middle + frames * period / 2
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * stages))
    for k, rows in enumerate(timings, 1):
        bars = [((t.infer_start - begin) * 1000, (t.infer_end - t.infer_start) * 1000) for t in rows
                if t.infer_end > begin and t.infer_start < end]
        ax.broken_barh(bars, (k - 0.4, 0.8), facecolors=f"C{k - 1}", edgecolors="white", linewidth=0.8)
    ax.set_xlim(0, (end - begin) * 1000)
    ax.set_yticks(range(1, stages + 1), [f"stage {k}" for k in range(1, stages + 1)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(f"busy intervals per stage in steady state ({frames} frame periods); gaps are idle time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_stage_times(predicted: list[float], measured: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = range(1, len(predicted) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([k - 0.2 for k in stages], predicted, width=0.4, label="planned (profile / (C x scale))")
    ax.bar([k + 0.2 for k in stages], measured, width=0.4, label="measured p50")
    ax.set_xticks(list(stages), [f"stage {k}" for k in stages])
    ax.set_ylabel("stage time (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def link_lines(measured: dict[str, Any]) -> list[str]:
    """The prediction with and without the boards' CPU on their links, so the paper's model can be judged."""
    paper = measured.get("paper_predicted_pipeline_throughput")
    if measured.get("link_costs") is None or paper is None:
        return ["- prediction: the paper's cost model (no link CPU was measured on the boards)"]
    costs = ", ".join(f"{c['send_ms_per_mb']:.2f} / {c['receive_ms_per_mb']:.2f} / {c.get('frame_ms') or 0.0:.2f}"
                      for c in measured["link_costs"])
    cpu = ", ".join(f"{s['planned_link_cpu_ms']:.2f}" for s in measured["spent"]["pipeline"])
    return [f"- the plan and the prediction count each board's CPU on its links and per frame (measured on the board, "
            f"device_config.link_cpu, ms per MB "
            f"sent / received / ms per frame: {costs}; per stage {cpu} ms): on a board of one core or less it comes "
            f"out of the same quota as the compute, so compute and send do not overlap. The paper's cost model "
            f"(links and frames cost no CPU) predicts {paper:.1f} inferences/s: the pipeline measured "
            f"{measured['pipeline_throughput'] / paper:.0%} "
            f"of it; the fastest board alone {measured['paper_predicted_single_throughput']:.1f} "
            f"({measured['single_throughput'] / measured['paper_predicted_single_throughput']:.0%})."]


def quota_lines(measured: dict[str, Any]) -> list[str]:
    """Whether the host gave the pipeline's bottleneck board and the fastest board alone their quotas while they ran,
    and their CPU a frame against the plan's (planned ms on the board's clock x its quota). A board that used its
    whole quota got what it emulates: a miss there is CPU a frame the profile did not see. One that used less
    waited: for a host core busy with other work, or for its neighbours (pure)."""
    runs, cores = measured.get("spent"), {b["device"]: b["cpu_cores"] for b in measured.get("fleet", [])}
    if not runs or not cores:
        return []
    pipeline, single = runs["pipeline"], runs["single"][0]
    worst = max(range(len(pipeline)), key=lambda k: pipeline[k]["planned_period_ms"])
    lines = [_spent_line(f"the pipeline's bottleneck, stage {worst + 1} on board {pipeline[worst]['device']}",
                         pipeline[worst], cores, "its input cut copied in and its output cut out"),
             _spent_line(f"the fastest board alone (board {single['device']})", single, cores,
                         "the input copied in and the result out")]
    return [line for line in lines if line is not None]


def _spent_line(name: str, stage: dict[str, Any], cores: dict[int, float], copies: str) -> Optional[str]:
    """One board's line (quota_lines); none when the run recorded no CPU. The stage's inference is timed with its
    copies in and out, which the plan counts as link CPU: only the totals compare."""
    quota, used = cores.get(stage["device"]), stage["cores_used"]
    cpu, inference = stage["cpu_ms_per_frame"], stage["inference_cpu_ms"]
    if quota is None or used is None or cpu is None or inference is None:
        return None
    compute, rest = stage["planned_compute_ms"] * quota, stage["planned_link_cpu_ms"] * quota
    verdict = ("the host gave it its quota" if used >= QUOTA_USED * quota else
               "under its quota: it waited for a host core busy with other work, or for its neighbours")
    return (f"- {name}: used about {used:.3f} of its {quota:.3g} cores ({used / quota:.0%}: {verdict}); "
            f"{cpu:.2f} ms of CPU a frame against {compute + rest:.2f} planned ({compute:.2f} compute, {rest:.2f} "
            f"links and frame); its inference, {copies}, took {inference:.2f} of it")


def fleet_section(measured: dict[str, Any]) -> list[str]:
    """Each board's limits and how often its quota held it back in each run, and what the host cannot emulate."""
    rows = ["| device | C | CPU quota (cores) | core set | memory limit MiB | run | quota periods | throttled | "
            "throttled s | killed for memory |", "|---:|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    boards = {b["device"]: b for b in measured["fleet"]}
    for run, per_device in measured["throttling"].items():
        for t in per_device:
            b = boards[t["device"]]
            rows.append(f"| {b['device']} | {b['C']:g} | {b['cpu_cores']:.3g} | {b['cpus'] or 'any'} | "
                        f"{b['memory_mb']:.0f} | {run} | {t['nr_periods']:.0f} | {t['nr_throttled']:.0f} | "
                        f"{t['throttled_s']:.2f} | {t['oom_kills']:.0f} |")
    return ["## The boards and their throttling (cgroup cpu.stat)", "", *rows, "",
            "What this host could not emulate: the boards share its cores, caches and memory bandwidth (a quota "
            "caps CPU time, it does not give a board a slower core: a quota period lets a board run at the "
            "host's speed until its share is used up), other work on the host takes from every board at once, "
            "and accelerators (a Jetson's GPU, a Coral's TPU) have no counterpart; links are tbf-shaped veths, "
            "without a radio's loss or jitter (netem is absent here).", ""]


def write_report(work: Work) -> str:
    config = load_config(work.config)
    plan = json.loads(work.plan.read_text())
    measured = json.loads(work.measured.read_text())
    C = config.cluster.C
    scale = measured["emulation_scale"]  # every emulated speed and bandwidth is x scale: times are / scale
    predicted, single_predicted = measured["predicted_pipeline_throughput"], measured["predicted_single_throughput"]
    speedup = measured["pipeline_throughput"] / measured["single_throughput"]
    stages = len(plan["pipeline_plan"])
    _plot_timeline(work.logs / "pipeline", stages, work.root / "timeline.png")
    pipeline = measured["spent"]["pipeline"]
    _plot_stage_times([s["planned_compute_ms"] for s in pipeline], measured["stage_time_p50_ms"],
                      work.root / "stage_times.png")

    rows = ["| stage | units | device | C | planned ms | link ms | host compute p50 | pacing p50 | transfer p50 | "
            "queueing p50 | frames over plan | CPU ms / frame (inference + the rest) | memory MiB / capacity |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (start, end, d), stage, hop, b, mem in zip(plan["pipeline_plan"], pipeline, measured["planned_hop_ms"],
                                                   measured["stages"], plan["stage_memory_mb"]):
        planned, cpu, inference = stage["planned_compute_ms"], stage["cpu_ms_per_frame"], stage["inference_cpu_ms"]
        cpu_text = "" if cpu is None or inference is None else f"{cpu:.2f} ({inference:.2f} + {cpu - inference:.2f})"
        rows.append(f"| {b['stage']} | {start}-{end} | {d} | {C[d - 1]:g} | {planned:.2f} | {_ms(hop or None)} | "
                    f"{_ms(b['host_compute_p50_ms'])} | {_ms(b['pacing_p50_ms'])} | {_ms(b['transfer_p50_ms'])} | "
                    f"{_ms(b['queueing_p50_ms'])} | {b['overruns']} / {b['frames']} | {cpu_text} | "
                    f"{mem:.1f} / {config.cluster.M[d - 1]:.1f} |")
    overruns = sum(b["overruns"] for b in measured["stages"] + measured["single_stages"])
    frames = sum(b["frames"] for b in measured["stages"] + measured["single_stages"])
    quota = measured.get("compute", "pace") == "cpu-quota"
    testbed = {"netns": "netns: each device's stage ran in its own network namespace, its link to a bridge shaped "
                        "with tbf to the device's B x scale",
               "fleet": "fleet: each device an emulated board (its own namespace, tbf link, cgroup CPU quota of C x "
                        "scale cores, memory limit, sshd); every stage started over ssh",
               }.get(measured["testbed"], "loopback: the stages talked over loopback (the run says why: namespaces "
                                          "need root and iproute2); compute is paced the same, links are not "
                                          "emulated")
    compute = ("- compute: cpu-quota (this run): no stage was paced; each board is slower by its CPU quota and "
               "the plan uses unit times measured on each board (profile: per-device)" if quota else
               "- compute: pace (this run): each stage computed at the host's speed, then waited out its device's "
               "planned time (profile: this host's, scaled by C)")
    summary = [
        compute,
        f"- testbed: {testbed}; {measured['usable_cores']:g} usable cores, every speed and bandwidth x {scale:.3g}; "
        f"stage links {'inside TLS' if measured.get('tls', True) else 'without TLS (--no-tls)'}",
        (f"- plan: bottleneck {plan['bottleneck_ms']:.2f} ms on the fleet, from each board's own unit times "
         f"(ideal {plan['ideal_ms']:.2f} ms); period between stages (compute and the hops) {1000 / predicted:.2f} ms"
         if quota else
         f"- plan: bottleneck {plan['bottleneck_ms']:.2f} ms on the real cluster (ideal sum(E)/sum(C) "
         f"{plan['ideal_ms']:.2f} ms); emulated period (stage compute and the hops between stages, / scale) "
         f"{1000 / predicted:.2f} ms"),
        f"- pipeline: {measured['pipeline_throughput']:.1f} inferences/s sustained, {predicted:.1f} predicted "
        f"({measured['pipeline_throughput'] / predicted:.0%}); measured with the source unpaced (fed as fast as the "
        f"pipeline takes inputs), so it may read above the prediction: above 100% means the devices are faster "
        f"than the model says",
        f"- fastest single device: {measured['single_throughput']:.1f} inferences/s sustained (source unpaced), "
        f"{single_predicted:.1f} predicted ({measured['single_throughput'] / single_predicted:.0%})",
        f"- speed-up of the pipeline over the fastest single device: {speedup:.2f}x measured, "
        f"{predicted / single_predicted:.2f}x predicted",
        f"- latency: end to end p50 {measured['latency_p50_ms']:.1f} ms, p95 {measured['latency_p95_ms']:.1f} ms, "
        f"in a third run of the pipeline with the source paced at {measured['latency_load']:.0%} of the predicted "
        f"throughput ({measured['latency_rate']:.1f} inferences/s offered, "
        f"{measured['latency_run_throughput']:.1f} delivered) and queues of one frame: latency means something "
        f"only below saturation",
        (f"- faithful: the host computed every stage within its device's planned time ({frames} stage-frames)"
         if overruns == 0 or quota else
         f"- NOT faithful in {overruns} of {frames} stage-frames: there the host computed slower than the emulated "
         f"device (column 'frames over plan'; their numbers are in measured.json), so those frames took longer "
         f"than the device would have"),
    ]
    if quota:
        summary = summary[:-1] + link_lines(measured) + quota_lines(measured)  # nothing paced: nothing overruns
        intro = (f"Work directory: `{work.root}`. Each device is an emulated board on this host (`python -m dnnpipe "
                 f"testbed up`): a CPU quota of C x {scale:.3g} cores makes it really slower, a memory limit really "
                 f"smaller, and it is reached over ssh like a board. Every unit was timed on every board, so the "
                 f"plan and its prediction are the boards' own; no stage waits for a planned time.")
    else:
        intro = (f"Work directory: `{work.root}`. Each device is emulated on this host: its stage computes, then "
                 f"waits until the device's planned time for the stage (profile / (C x {scale:.3g})) has passed "
                 f"since the frame started, so a stage takes max(host compute, planned). The common factor makes "
                 f"the emulated cluster fit this host's usable cores; it leaves the plan and the speed-up as they "
                 f"are.")
    text = "\n".join([
        f"# DNNPipe demo: {work.name}", "",
        intro + " The first device reads its inputs locally and the last writes results locally, as deployed, so "
        "the plan's input and output hops are not part of the emulated period (their CPU is: the plan counts taking "
        "in an input and passing on a result as a cut of that size received or sent).", "",
        "## Plan and where the time went", "", *rows, "", "## Throughput and latency", "", *summary, "",
        *(fleet_section(measured) if quota else []),
        "![stage times](stage_times.png)", "", "![timeline](timeline.png)", "",
        "## Artefacts", "",
        f"- model `{work.model}`, inputs `{work.dataset}`, config `{work.config}`, plan `{work.plan}`",
        f"- sub-models and manifest `{work.parts / work.name}`, deployed copies `{work.devices}`",
        f"- per-frame logs `{work.logs}` (a folder per run, each with the results it wrote), results of the "
        f"throughput run `{work.results}`", "",
        "## The same steps by hand", "", "```",
        *([f"python -m dnnpipe testbed up --cluster {work.root / 'fleet_cluster.json'} --registry {work.registry} "
           f"--state {work.root / 'fleet'}",
           f"python -m dnnpipe profile --model-path {work.models} --model-name {work.name} --config {work.configs} "
           f"--devices {work.root / 'fleet_cluster.json'} --device-registry {work.registry}"] if quota else
          [f"python -m dnnpipe profile --model-path {work.models} --model-name {work.name} --config "
           f"{work.configs}"]),
        f"python model_partitioner.py --model-path {work.models} --config {work.configs} "
        f"--output-dir {work.parts} --model-name {work.name}",
        f"python deployer.py --device-registry {work.registry} --model-path {work.parts} --model-name {work.name} "
        f"--config {work.configs} --dataset {work.dataset}",
        f"python -m dnnpipe run-local --model-path {work.parts} --model-name {work.name} --data-path {work.dataset} "
        f"--output-path {work.results} --config {work.configs} --emulate-speed --scale {scale:.6g} "
        f"--queue-size 1 --num-threads 1",
        f"python -m dnnpipe run-local --model-path {work.parts} --model-name {work.name} --data-path {work.dataset} "
        f"--config {work.configs} --emulate-speed --scale {scale:.6g} --fps {measured['latency_rate']:.6g} "
        f"--queue-size 1 --num-threads 1  # latency, below saturation",
        "```", ""])
    work.report.write_text(text)
    return "\n".join(summary + [f"wrote {work.report}, {work.root / 'timeline.png'}, {work.root / 'stage_times.png'}"])
