"""Conversion cost: all stages of a plan against one conversion of the whole model.

    .venv/bin/python benchmarks/partition.py                       # tiny, mobilenetv2, efficientnetv2b0
    .venv/bin/python benchmarks/partition.py --models tiny

Stages are equal-sized unit ranges; each row is one run of split_model (no verification).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnnpipe.examples import EXAMPLES  # noqa: E402
from dnnpipe.partition.graph import analyse  # noqa: E402
from dnnpipe.partition.split import split_model  # noqa: E402
from dnnpipe.tfenv import import_tensorflow  # noqa: E402


def even_plan(U: int, stages: int) -> list[list[int]]:
    bounds = [round(U * i / stages) for i in range(stages + 1)]
    return [[a + 1, b, i + 1] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "mobilenetv2", "efficientnetv2b0"],
                        choices=sorted(EXAMPLES))
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 4, 8])
    args = parser.parse_args()
    _, keras = import_tensorflow()
    print(f"{'model':<18} {'units':>5} {'stages':>6} {'seconds':>8} {'x whole':>8} {'MB total':>9}")
    for name in args.models:
        keras.utils.set_random_seed(0)
        model = EXAMPLES[name]()
        graph, tensors = analyse(model)
        whole = None
        for stages in args.stages:
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                split_model(graph, tensors, even_plan(graph.U, stages), Path(folder), name, progress=lambda _: None)
                seconds = time.perf_counter() - started
                size = sum(p.stat().st_size for p in Path(folder).glob("*.tflite")) / 1e6
            whole = whole or seconds
            print(f"{name:<18} {graph.U:>5} {stages:>6} {seconds:>8.1f} {seconds / whole:>8.2f} {size:>9.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
