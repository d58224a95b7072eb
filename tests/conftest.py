import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import settings

# No per-example deadline: on a loaded 2-core CI machine one scheduler stall fails a property as "unreliable
# timings"; what a property checks is exactness, and speed is the benchmarks' job.
settings.register_profile("dnnpipe", deadline=None)
settings.load_profile("dnnpipe")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

REFERENCE_PROFILE = ROOT.parent / "shared" / "reference" / "efficientnetv2b0-paper-testbed.json"


@pytest.fixture
def reference_profile() -> Path:
    if not REFERENCE_PROFILE.exists():
        pytest.skip(f"reference profile not found at {REFERENCE_PROFILE}")
    return REFERENCE_PROFILE


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real OpenSSH server on loopback (tests/sshd.py), one per test module."""
    from sshd import start_sshd

    server, process = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    process.terminate()
    process.wait(10)


def _partitioned(root: Path, stages: list, rows: int) -> Path:
    """partitioned_submodels/res (the residual CNN cut into `stages`; -1 stands for its last unit) and a dataset
    of `rows` images under `root`."""
    import models
    from dnnpipe.partition.graph import analyse
    from dnnpipe.partition.partitioner import partition_keras_model

    model = models.residual_cnn()
    U = analyse(model)[0].U
    partition_keras_model(model, [[a, U if b == -1 else b, d] for a, b, d in stages],
                          root / "partitioned_submodels" / "res", "res", "test", verify_chain=False)
    with h5py.File(root / "dataset.h5", "w") as f:
        f["images"] = np.random.default_rng(0).random((rows, 12, 12, 3)).astype("float32")
    return root


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    """partitioned_submodels/res: the residual CNN in 3 stages on devices 3, 1, 2; and a dataset of 5 rows."""
    return _partitioned(tmp_path_factory.mktemp("deploy"), [[1, 4, 3], [5, 9, 1], [10, -1, 2]], 5)


@pytest.fixture(scope="module")
def one_stage(tmp_path_factory):
    """partitioned_submodels/res: the residual CNN in one stage on device 1; and a dataset of 2 rows."""
    return _partitioned(tmp_path_factory.mktemp("deploy"), [[1, -1, 1]], 2)
