"""The demo's report: predicted against measured, as Markdown with a timeline and a stage-time chart."""

from __future__ import annotations

import json
from pathlib import Path
from ..config import load_config
from ..runtime.metrics import read_timings
from .work import Work


def _plot_timeline(log_dir: Path, stages: int, path: Path, frames: int = 12) -> None:
    """Every stage's busy intervals (inference plus emulated slowdown) in one window of steady state."""
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
    ax.bar([k - 0.2 for k in stages], predicted, width=0.4, label="predicted (profile / C)")
    ax.bar([k + 0.2 for k in stages], measured, width=0.4, label="measured p50")
    ax.set_xticks(list(stages), [f"stage {k}" for k in stages])
    ax.set_ylabel("stage time (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(work: Work) -> str:
    config = load_config(work.config)
    plan = json.loads(work.plan.read_text())
    measured = json.loads(work.measured.read_text())
    C = config.cluster.C
    scale = measured["emulation_scale"]  # every emulated speed is C x scale: predictions scale alike
    predicted = 1000.0 / plan["bottleneck_ms"] * scale
    single_predicted = 1000.0 / (sum(config.profile.E) / max(C)) * scale
    stage_predicted = [t / scale for t in plan["stage_times_ms"]]
    speedup = measured["pipeline_throughput"] / measured["single_throughput"]
    closeness = measured["pipeline_throughput"] / predicted
    stages = len(plan["pipeline_plan"])
    _plot_timeline(work.logs / "pipeline", stages, work.root / "timeline.png")
    _plot_stage_times(stage_predicted, measured["stage_time_p50_ms"], work.root / "stage_times.png")

    rows = ["| stage | units | device | C | predicted ms (emulated) | measured p50 ms | memory MiB / capacity |",
            "|---:|---|---:|---:|---:|---:|---|"]
    for k, ((start, end, d), p, m, mem) in enumerate(zip(plan["pipeline_plan"], plan["stage_times_ms"],
                                                          measured["stage_time_p50_ms"], plan["stage_memory_mb"]), 1):
        p = p / scale
        rows.append(f"| {k} | {start}-{end} | {d} | {C[d - 1]:g} | {p:.2f} | {m:.2f} | "
                    f"{mem:.1f} / {config.cluster.M[d - 1]:.1f} |")
    summary = [
        f"- plan: bottleneck {plan['bottleneck_ms']:.2f} ms on the real cluster (ideal sum(E)/sum(C) "
        f"{plan['ideal_ms']:.2f} ms); emulated here with every speed x {scale:.3g}: predicted "
        f"{plan['bottleneck_ms'] / scale:.2f} ms, {predicted:.1f} inferences/s",
        f"- measured pipeline: {measured['pipeline_throughput']:.1f} inferences/s, end-to-end latency p50 "
        f"{measured['latency_p50_ms']:.1f} ms, p95 {measured['latency_p95_ms']:.1f} ms",
        f"- measured/predicted throughput: {closeness:.0%}",
        f"- fastest single device (C = {max(C):g}, emulated x {scale:.3g}): {measured['single_throughput']:.1f} "
        f"inferences/s measured, {single_predicted:.1f} predicted",
        f"- speed-up of the pipeline over the fastest single device: {speedup:.2f}x",
    ]
    text = "\n".join([
        f"# DNNPipe demo: {work.name}", "",
        f"Work directory: `{work.root}`. Device speeds are emulated on this machine: every stage sleeps after "
        f"each inference so that its stage time is its measured time / (C x {scale:.3g}). The common factor "
        f"keeps the emulated cluster within half of this host's cores; it leaves the plan and the speed-up as "
        f"they are.", "",
        "## Plan", "", *rows, "", "## Throughput and latency", "", *summary, "",
        "![stage times](stage_times.png)", "", "![timeline](timeline.png)", "",
        "## Artefacts", "",
        f"- model `{work.model}`, inputs `{work.dataset}`, config `{work.config}`, plan `{work.plan}`",
        f"- sub-models and manifest `{work.parts / work.name}`, deployed copies `{work.devices}`",
        f"- per-frame logs `{work.logs}`, results `{work.results}`", "",
        "## The same steps by hand", "", "```",
        f"python -m dnnpipe profile --model-path {work.models} --model-name {work.name} --config {work.configs}",
        f"python model_partitioner.py --model-path {work.models} --config {work.configs} "
        f"--output-dir {work.parts} --model-name {work.name}",
        f"python deployer.py --device-registry {work.registry} --model-path {work.parts} --model-name {work.name} "
        f"--config {work.configs} --dataset {work.dataset}",
        f"python -m dnnpipe run-local --model-path {work.parts} --model-name {work.name} --data-path {work.dataset} "
        f"--output-path {work.results} --config {work.configs} --emulate-speed",
        "```", ""])
    work.report.write_text(text)
    return "\n".join(summary + [f"wrote {work.report}, {work.root / 'timeline.png'}, {work.root / 'stage_times.png'}"])
