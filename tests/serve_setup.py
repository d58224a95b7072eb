"""A served pipeline's files for tests and benchmarks: a profiled model, its plan, sub-models, data, a registry
of `local` devices, and the model's own outputs for every row (the reference OUT must equal)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np


@dataclass(frozen=True)
class Served:
    root: Path
    parts: Path  # --model-path
    name: str
    config: Path  # the config file
    keras_model: Path
    data: Path
    expected: dict[str, np.ndarray]  # output name -> one row per data row

    def registry(self, devices: Sequence[int], path: Path) -> Path:
        """A registry of `local` devices, each in its own folder below the work folder, on a free port."""
        ports = free_ports(len(devices))
        entries = [{"device_id": d, "host": "local", "remote_dir": str(self.root / f"device_{d}"),
                    "runtime_port": port} for d, port in zip(devices, ports)]
        path.write_text(json.dumps({"devices": entries}))
        return path

    def args(self, registry: Path, out: Path, *extra: str) -> list[str]:
        return ["serve", "--device-registry", str(registry), "--model-path", str(self.parts), "--model-name",
                self.name, "--config", str(self.config), "--data-path", str(self.data), "--output-path", str(out),
                "--keras-model", str(self.keras_model), *extra]

    def check(self, out: Path, total: int) -> None:
        """OUT holds every input exactly once, in input order, equal to the model's outputs."""
        rows = len(next(iter(self.expected.values())))
        with h5py.File(out) as f:
            assert f.attrs["complete"] and int(f.attrs["stored"]) == total
            for name, expected in self.expected.items():
                assert f[name].shape[0] == total
                np.testing.assert_allclose(f[name][:], expected[np.arange(total) % rows], rtol=1e-4, atol=1e-4)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def make_served(root: Path, speeds: Sequence[float], input_size: int = 48, rows: int = 8) -> Served:
    """The example tiny CNN, profiled on this machine, planned for `speeds`, partitioned by that plan."""
    from dnnpipe.examples import tiny_cnn
    from dnnpipe.jsonio import write_json
    from dnnpipe.partition.partitioner import partition_keras_model
    from dnnpipe.planfile import write_plan
    from dnnpipe.planner import plan
    from dnnpipe.profile.profiler import config_from, profile_keras_model
    from dnnpipe.tfenv import import_tensorflow

    _, keras = import_tensorflow()
    keras.utils.set_random_seed(0)
    model = tiny_cnn(input_size)
    keras_model = root / "tiny.keras"
    model.save(keras_model)
    profile = profile_keras_model(model, repeats=10, warmup=3)
    config = root / "configurations" / "tiny" / "config.json"
    config.parent.mkdir(parents=True)
    write_json(config, config_from(profile, {"N": len(speeds), "C": list(speeds), "M": [1e4] * len(speeds)}))
    result = plan(config)
    write_plan(result, config.parent / "pipeline_plan.json")
    parts = root / "parts"
    partition_keras_model(model, result.stages, parts / "tiny", "tiny", str(config), verify_chain=False,
                          echo=lambda _: None)
    images = np.random.default_rng(0).random((rows, input_size, input_size, 3)).astype("float32")
    data = root / "data.h5"
    with h5py.File(data, "w") as f:
        f["images"] = images
    outputs = model(images, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    names = [o.name.split("/")[0] for o in model.outputs]
    from dnnpipe.manifest import read_manifest

    specs = read_manifest(parts / "tiny").outputs
    expected = {spec.name: np.asarray(value) for spec, value in zip(specs, outputs)}
    assert len(names) == len(specs)
    return Served(root, parts, "tiny", config, keras_model, data, expected)
