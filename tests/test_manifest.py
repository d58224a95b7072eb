"""manifest.json: what the runtime and the deployer trust, checked when read."""

import json

import pytest

from dnnpipe.errors import ConfigError
from dnnpipe.manifest import Manifest, StageSpec, TensorSpec, read_manifest, sha256_file, write_manifest

IMAGE = TensorSpec("image", "image", (1, 8, 8, 3), "float32")
MIDDLE = TensorSpec("conv:0", "conv_0", (1, 4, 4, 16), "float32")
LOGITS = TensorSpec("logits", "logits", (1, 10), "float32")


def two_stages() -> Manifest:
    return Manifest("m", 5, "none", (StageSpec(1, 2, (1, 3), "sub_model_1.tflite", "a" * 64, (IMAGE,), (MIDDLE,)),
                                     StageSpec(2, 1, (4, 5), "sub_model_2.tflite", "b" * 64, (MIDDLE,), (LOGITS,))))


def test_round_trip_keeps_every_field(tmp_path):
    manifest = two_stages()
    write_manifest(manifest, tmp_path)
    assert read_manifest(tmp_path) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["cuts"] == [{"after_unit": 3, "tensors": ["conv:0"], "bytes": 4 * 4 * 16 * 4}]
    assert data["stages"][0]["input_bytes"] == 8 * 8 * 3 * 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_stage_lookup_names_the_range():
    assert two_stages().stage(2).device == 1
    with pytest.raises(ConfigError, match=r"stage 3 does not exist: the manifest has stages 1..2"):
        two_stages().stage(3)


def mangle(tmp_path, change):
    write_manifest(two_stages(), tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    change(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(version=99), "expected format 'dnnpipe-manifest' version 1"),
    (lambda d: d.update(stages=[]), "no stages"),
    (lambda d: d["stages"][1]["inputs"][0].update(name="other"), "stage 1 outputs ['conv:0'] but stage 2 takes"),
    (lambda d: d["stages"][0].pop("sha256"), "stages[0].sha256 is missing"),
    (lambda d: d["stages"][0]["inputs"][0].update(dtype="complex-ish"), "stages[0].inputs[0].dtype must be one of"),
    # hostile values: each would reach a file system or a remote command
    (lambda d: d["stages"][1].update(file="../../etc/passwd"), "stages[1].file must be a plain file name"),
    (lambda d: d["stages"][0].update(file="/etc/passwd"), "stages[0].file must be a plain file name"),
    (lambda d: d["stages"][0].update(sha256="$(touch /tmp/x)" + "a" * 49), "stages[0].sha256 must be 64"),
    (lambda d: d["stages"][0].update(sha256="A" * 64), "stages[0].sha256 must be 64 lowercase hex digits"),
    (lambda d: d.update(model_name="../x"), "model_name must be a plain folder name"),
    (lambda d: d["stages"][1].update(stage=3), "stages[1].stage must be 2: stages are numbered 1..K in order"),
    (lambda d: d["stages"][1].update(units=[5, 5]), "stages[1].units starts at 5, expected 4"),
    (lambda d: d["stages"][0].update(units=[3, 1]), "stages[0].units must be [first, last] with 1 <= first"),
    (lambda d: d.update(units=9), "the stages cover units 1..5 but units is 9"),
    (lambda d: d["stages"][0]["outputs"][0].update(shape=[1, -4, 4, 16]), "outputs[0].shape must be a list"),
    (lambda d: d["stages"][0]["outputs"][0].update(key="a b"), "stages[0].outputs[0].key must be a signature key"),
    (lambda d: d["stages"][0]["inputs"][0].update(name="a\nb"), "stages[0].inputs[0].name must be a tensor name"),
    (lambda d: d["stages"][1].update(file="sub_model_1.tflite"), "stage files must be distinct"),
])
def test_malformed_manifests_are_refused_with_the_file_named(tmp_path, change, message):
    folder = mangle(tmp_path, change)
    with pytest.raises(ConfigError, match="manifest.json") as error:
        read_manifest(folder)
    assert message in str(error.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_sha256_of_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
