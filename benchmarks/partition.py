"""Partitioning cost side by side: slicing one converted model vs converting each stage vs one whole conversion.

    .venv/bin/python benchmarks/partition.py                       # tiny, mobilenetv2, efficientnetv2b0
    .venv/bin/python benchmarks/partition.py --models tiny --stages 2 4

Stages are equal-sized unit ranges moved to the nearest legal cut. Each row, one after the other in one
process: one whole-model conversion (the reference, "x whole" = 1); slicing as split_model does it, that one
conversion plus mapping the units onto it, cutting every stage and checking the chain against the whole model;
split_model converting each stage. These three in CPU seconds of this process (the machine is shared, so wall
time is not comparable between them).
Then `slice` of a new plan from the stored model in-process (wall ms) and as `python -m dnnpipe slice`
(wall s, with its chain check), and the sub-models' total size relative to the whole model.tflite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnnpipe.examples import EXAMPLES  # noqa: E402
from dnnpipe.manifest import write_manifest  # noqa: E402
from dnnpipe.partition.graph import analyse  # noqa: E402
from dnnpipe.partition.split import (keras_cut_table, slice_converted, split_model,  # noqa: E402
                                     whole_model_flatbuffer)
from dnnpipe.slicing.cuts import signature_keys  # noqa: E402
from dnnpipe.slicing.slicer import reslice  # noqa: E402
from dnnpipe.tfenv import import_tensorflow  # noqa: E402


def even_plan(U: int, stages: int, cuts: list[int]) -> list[list[int]]:
    """Equal unit ranges, each boundary moved to the nearest legal cut (and kept increasing)."""
    bounds = [0]
    for i in range(1, stages):
        target = round(U * i / stages)
        choices = [c for c in cuts if c > bounds[-1]]
        bounds.append(min(choices, key=lambda c: abs(c - target)))
    bounds.append(U)
    return [[a + 1, b, i + 1] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def quiet(_: str) -> None:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "mobilenetv2", "efficientnetv2b0"],
                        choices=sorted(EXAMPLES))
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4, 8])
    args = parser.parse_args()
    _, keras = import_tensorflow()
    print(f"{'model':<16} {'units':>5} {'cuts':>5} {'stages':>6} {'whole s':>8} {'sliced s':>9} {'x whole':>8} "
          f"{'per-stage s':>11} {'x whole':>8} {'slice ms':>9} {'slice cmd s':>11} {'MB whole':>9} {'x size':>7}")
    for name in args.models:
        keras.utils.set_random_seed(0)
        model = EXAMPLES[name]()
        graph, tensors = analyse(model)
        keys = signature_keys(t.name for t in graph.tensors)
        flatbuffer = whole_model_flatbuffer(graph, tensors, keys, "none", None)  # warm-up: the first trace is slower
        cuts = sorted(c for c in keras_cut_table(graph, tensors, keys, flatbuffer, "none") if 0 < c < graph.U)
        for stages in args.stages:
            plan, new_plan = even_plan(graph.U, stages, cuts), _shifted(graph.U, stages, cuts)
            with tempfile.TemporaryDirectory() as sliced, tempfile.TemporaryDirectory() as converted:
                folder = Path(sliced) / name
                started = time.process_time()  # CPU time: the machine is shared, wall time is not comparable
                flatbuffer = whole_model_flatbuffer(graph, tensors, keys, "none", None)
                whole_s = time.process_time() - started
                started = time.process_time()
                write_manifest(slice_converted(graph, tensors, flatbuffer, plan, folder, name, "none", keys, quiet),
                               folder)
                sliced_s = whole_s + time.process_time() - started  # split_model's slicing: this plus a conversion
                started = time.process_time()
                split_model(graph, tensors, plan, Path(converted) / name, name, progress=quiet, slicing="never")
                per_stage_s = time.process_time() - started
                started = time.perf_counter()
                reslice(folder, new_plan, "benchmark plan")
                slice_s = time.perf_counter() - started
                plan_file = Path(sliced) / "plan.json"
                plan_file.write_text(json.dumps({"pipeline_plan": plan}))
                started = time.perf_counter()
                result = subprocess.run([sys.executable, "-m", "dnnpipe", "slice", "--model-path", sliced,
                                         "--model-name", name, "--plan", str(plan_file)],
                                        capture_output=True, text=True, cwd=ROOT, timeout=300)
                command_s = time.perf_counter() - started
                if result.returncode != 0:
                    raise SystemExit(result.stderr)
                whole_mb = (folder / "model.tflite").stat().st_size / 1e6
                parts_mb = sum(p.stat().st_size for p in folder.glob("sub_model_*.tflite")) / 1e6
            print(f"{name:<16} {graph.U:>5} {len(cuts):>5} {stages:>6} {whole_s:>8.2f} {sliced_s:>9.2f} "
                  f"{sliced_s / whole_s:>8.2f} {per_stage_s:>11.2f} {per_stage_s / whole_s:>8.2f} "
                  f"{slice_s * 1000:>9.0f} {command_s:>11.2f} {whole_mb:>9.2f} {parts_mb / whole_mb:>7.3f}",
                  flush=True)


def _shifted(U: int, stages: int, cuts: list[int]) -> list[list[int]]:
    """A different plan over the legal cuts: boundaries at the legal cuts nearest to 1/3 of the way."""
    bounds = [0]
    for i in range(1, stages):
        target = U * (i - 0.4) / stages
        choices = [c for c in cuts if c > bounds[-1]]
        bounds.append(min(choices, key=lambda c: abs(c - target)))
    bounds.append(U)
    return [[a + 1, b, stages - i] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


if __name__ == "__main__":
    main()
