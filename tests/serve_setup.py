"""A served pipeline's files for tests and benchmarks: a profiled model, its plan, sub-models, data, a registry
of `local` devices, and the model's own outputs for every row (the reference OUT must equal)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import h5py
import numpy as np

from dnnpipe.testbed.local import free_ports


@dataclass(frozen=True)
class Served:
    root: Path
    parts: Path  # --model-path
    name: str
    config: Path  # the config file
    data: Path
    expected: dict[str, np.ndarray]  # output name -> one row per data row

    def registry(self, devices: Sequence[int], path: Path, ports: Optional[dict[int, int]] = None) -> Path:
        """A registry of `local` devices, each in its own folder below the work folder, on a free port."""
        ports = ports or dict(zip(devices, free_ports(len(devices))))
        entries = [{"device_id": d, "host": "local", "remote_dir": str(self.root / f"device_{d}"),
                    "runtime_port": ports[d]} for d in devices]
        path.write_text(json.dumps({"devices": entries}))
        return path

    def args(self, registry: Path, out: Path, *extra: str) -> list[str]:
        return ["serve", "--device-registry", str(registry), "--model-path", str(self.parts), "--model-name",
                self.name, "--config", str(self.config), "--data-path", str(self.data), "--output-path", str(out),
                "--work-dir", str(out.parent / "serve_work"), *extra]

    def check(self, out: Path, total: int) -> None:
        """OUT holds every input exactly once, in input order, equal to the model's outputs."""
        rows = len(next(iter(self.expected.values())))
        with h5py.File(out) as f:
            assert f.attrs["complete"] and int(f.attrs["stored"]) == total
            for name, expected in self.expected.items():
                assert f[name].shape[0] == total
                np.testing.assert_allclose(f[name][:], expected[np.arange(total) % rows], rtol=1e-4, atol=1e-4)


def make_served(root: Path, speeds: Sequence[float], kind: str = "tiny", input_size: Optional[int] = 48,
                rows: int = 8, repeats: int = 10, build: Optional[Callable[[], Any]] = None) -> Served:
    """An example model (dnnpipe.examples) converted once to a .tflite file whose operators are the units (every
    cut exists, so any re-plan slices in milliseconds), profiled with the interpreter, planned for `speeds`,
    partitioned by that plan. `build` makes another Keras model instead."""
    from dnnpipe.examples import EXAMPLES
    from dnnpipe.jsonio import write_json
    from dnnpipe.manifest import read_manifest
    from dnnpipe.partition.convert import convert_stage
    from dnnpipe.slicing.cuts import signature_keys
    from dnnpipe.partition.graph import analyse, as_functional
    from dnnpipe.planfile import write_plan
    from dnnpipe.keygen import create_key
    from dnnpipe.planner import plan
    from dnnpipe.profile.costs import config_from
    from dnnpipe.profile.tflite import profile_tflite
    from dnnpipe.slicing.tflite_model import partition_tflite
    from dnnpipe.tfenv import import_tensorflow

    _, keras = import_tensorflow()
    keras.utils.set_random_seed(0)
    model = as_functional(build() if build else EXAMPLES[kind](input_size) if input_size else EXAMPLES[kind]())
    graph, _ = analyse(model)
    keys = signature_keys(t.name for t in graph.tensors)
    whole = root / "tiny.tflite"
    whole.write_bytes(convert_stage(model, graph.crossing(0), graph.crossing(graph.U), keys))
    profile = profile_tflite(whole, repeats=repeats, warmup=3)
    config = root / "configurations" / "tiny" / "config.json"
    config.parent.mkdir(parents=True)
    write_json(config, config_from(profile, {"N": len(speeds), "C": list(speeds), "M": [1e4] * len(speeds)}))
    result = plan(config)
    write_plan(result, config.parent / "pipeline_plan.json")
    parts = root / "parts"
    partition_tflite(whole, result.stages, parts / "tiny", "tiny", str(config), verify_chain=False, progress=None)
    create_key(parts / "tiny")  # serve and the stages authenticate every link with it
    shape = tuple(model.inputs[0].shape[1:])
    images = np.random.default_rng(0).random((rows, *shape)).astype("float32")
    data = root / "data.h5"
    with h5py.File(data, "w") as f:
        f["images"] = images
    specs = read_manifest(parts / "tiny").outputs
    assert len(specs) == 1
    expected = {specs[0].name: np.asarray(model(images, training=False))}
    return Served(root, parts, "tiny", config, data, expected)
