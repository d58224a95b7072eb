"""The demo on the virtual testbed: predicted against measured, for the README's demo table.

    .venv/bin/python benchmarks/testbed.py [--models tiny efficientnetv2b0] [--compute pace cpu-quota] [--no-tls]
        [--work-dir DIR]

Per model: the demo's paper-like cluster on gigabit links, then (tiny only) a link-bound cluster (`--cluster`
with 40 Mbit/s links and slow devices, so the plan's bottleneck is a hop between two stages) re-planned on
the same profile. Each row: pipeline and fastest-device throughput, predicted / measured (sustained: the
source unpaced), the speed-up both ways, latency with the source paced at 80% of the predicted throughput, and how
many stage-frames the host could not pace; with the load average before the run (the host may be shared).
Run as root for network namespaces and tbf-shaped links; otherwise the demo says it fell back to loopback.
Each compute mode side by side: `pace` (stages paced to the plan on the host) and `cpu-quota` (the virtual
fleet: boards with CPU quotas and memory limits over ssh, profiled per device, no pacing; root only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK_BOUND = {"C": [0.1, 0.05, 0.05, 0.05], "M": [100, 100, 100, 100], "B": [40, 40, 40, 40]}


def demo(work: Path, model: str, *extra: str) -> tuple[float, float]:
    """The demo's wall time, and the load average (1 min) just before it."""
    load, began = os.getloadavg()[0], time.perf_counter()
    command = [sys.executable, "-m", "dnnpipe", "demo", "--model", model, "--work-dir", str(work), *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - began, load


def row(name: str, work: Path, timed: tuple[float, float]) -> str:
    m = json.loads((work / "measured.json").read_text())
    plan = json.loads((work / "configurations" / work.name / "pipeline_plan.json").read_text())
    pipe, single = m["pipeline_throughput"], m["single_throughput"]
    pipe_p, single_p = m["predicted_pipeline_throughput"], m["predicted_single_throughput"]
    over = sum(s["overruns"] for s in m["stages"] + m["single_stages"])
    frames = sum(s["frames"] for s in m["stages"] + m["single_stages"])
    seconds, load = timed
    return (f"| {name} | {m.get('compute', 'pace')} | {'TLS' if m.get('tls', True) else 'no TLS'} | {m['testbed']} | "
            f"{m['emulation_scale']:.3g} | {len(plan['pipeline_plan'])} | "
            f"{pipe_p:.1f} / {pipe:.1f} ({pipe / pipe_p:.0%}) | "
            f"{single_p:.1f} / {single:.1f} ({single / single_p:.0%}) | "
            f"{pipe_p / single_p:.2f}x / {pipe / single:.2f}x | "
            f"{m['latency_p50_ms']:.0f} / {m['latency_p95_ms']:.0f} | {over} / {frames} | {paper(m)} | "
            f"{load:.1f} | {seconds:.0f} s |")


def paper(m: dict) -> str:
    """The paper's cost model (links cost no device CPU) against measured, where the prediction counts the
    boards' measured link CPU (cpu-quota); the same prediction otherwise."""
    predicted = m.get("paper_predicted_pipeline_throughput")
    if predicted is None or m.get("link_costs") is None:
        return "same"
    return f"{predicted:.1f} / {m['pipeline_throughput']:.1f} ({m['pipeline_throughput'] / predicted:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "mobilenetv2", "efficientnetv2b0"])
    parser.add_argument("--compute", nargs="+", default=["pace", "cpu-quota"], choices=["pace", "cpu-quota"],
                        help="compute modes to run side by side (default both)")
    parser.add_argument("--work-dir", type=Path, help="keep the work directories here (default: a temporary one)")
    parser.add_argument("--no-tls", action="store_true", help="every demo with --no-tls (column 'links')")
    args = parser.parse_args()
    links = ["--no-tls"] if args.no_tls else []
    with tempfile.TemporaryDirectory() as temporary:
        base = args.work_dir or Path(temporary)
        rows = []
        for model in args.models:
            work = base / model
            if "cpu-quota" in args.compute:
                fleet_work = base / "cpu-quota" / model
                rows.append(row(f"{model}, paper-like cluster, 1000 Mbit/s", fleet_work,
                                demo(fleet_work, model, "--compute", "cpu-quota", *links)))
            if "pace" not in args.compute:
                continue
            rows.append(row(f"{model}, paper-like cluster, 1000 Mbit/s", work, demo(work, model, *links)))
            if model == "tiny":
                cluster = base / "link-bound.json"
                cluster.write_text(json.dumps(LINK_BOUND))
                bound = base / "link-bound" / model
                bound.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-r", str(work), str(bound)], check=True)
                timed = demo(bound, model, "--cluster", str(cluster), "--steps", "plan", "partition", "deploy", "run",
                             "report", *links)
                rows.append(row(f"{model}, link-bound: C {LINK_BOUND['C']}, 40 Mbit/s", bound, timed))
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs here, usable {len(os.sched_getaffinity(0))}; load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
    print("Throughput as sustained: the source unpaced (fed as fast as the pipeline takes inputs); latency with "
          "the source paced at 80% of the predicted throughput (below saturation).")
    print("| run | compute | links | testbed | scale | stages | pipeline inf/s predicted / sustained | fastest device "
          "predicted / sustained | speed-up predicted / measured | latency p50 / p95 ms at 80% | "
          "frames over plan | pipeline, paper's model (no link CPU) / measured | load before | time |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
