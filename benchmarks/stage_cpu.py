"""A stage's CPU per frame outside its inference (issue 27): what a slow board pays on top of the plan's compute.

    .venv/bin/python benchmarks/stage_cpu.py [--work-dir DIR] [--fps 40] [--num-inputs 300] [--no-tls]

Makes the tiny demo model's pipeline in DIR (`demo --steps model profile plan partition`, unless DIR has it),
runs it on loopback with the source paced at --fps (so the host is not saturated and no stage waits on a full
queue), and prints each stage's process CPU time per frame (every thread), the inference's share of it (the
executor thread's CPU around the interpreter call) and the rest: receiving, decoding, TLS, hand-offs between the
stage's threads, sending. CPU time, unlike wall time, hardly depends on what else runs on the host.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnnpipe.runtime.stage import RunOptions  # noqa: E402
from dnnpipe.testbed.local import run_local  # noqa: E402


def ensure_parts(work: Path) -> None:
    if (work / "partitioned_submodels" / "tiny" / "manifest.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "dnnpipe", "demo", "--model", "tiny", "--work-dir", str(work), "--steps",
                    "model", "profile", "plan", "partition"], check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, help="a tiny demo's work directory (default: a temporary one)")
    parser.add_argument("--fps", type=float, default=40.0)
    parser.add_argument("--num-inputs", type=int, default=300)
    parser.add_argument("--no-tls", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        ensure_parts(work)
        run = RunOptions(num_inputs=args.num_inputs, num_threads=1, queue_size=1, tls=not args.no_tls, fps=args.fps)
        result = run_local(work / "partitioned_submodels" / "tiny", work / "dataset.h5", None,
                           Path(temporary) / "logs", None, run)
    load = os.getloadavg()
    print(f"tiny model, {len(result.stages)} stages on loopback, TLS {not args.no_tls}, source at {args.fps:g} "
          f"inferences/s, {args.num_inputs} inputs; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("| stage | frames | CPU ms/frame | inference CPU ms | rest (outside the inference) ms |")
    print("|---:|---:|---:|---:|---:|")
    for s in result.stages:
        assert s.cpu_ms_per_frame is not None and s.inference_cpu_ms is not None
        print(f"| {s.stage} | {s.frames} | {s.cpu_ms_per_frame:.3f} | {s.inference_cpu_ms:.3f} | "
              f"{s.cpu_ms_per_frame - s.inference_cpu_ms:.3f} |")


if __name__ == "__main__":
    main()
