"""Loading the models users have: Keras 2 (tf.keras) and Keras 3 H5 files, .keras files, SavedModel folders.

Keras 3's own loader does the work (its legacy H5 loader for .h5, so weights are matched the way Keras
matches them); Keras 2 configs are first rewritten by legacy.translate, and the loaded model is then
checked against the file, layer by layer and weight by weight. A SavedModel folder or .keras file written
by tf.keras is read by the optional tf_keras package in a child process and handed on as an H5 file.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import DnnpipeError
from ..native import native_stderr_captured
from ..tfenv import import_tensorflow
from .legacy import MODELS, WEIGHT_RENAMES, is_keras2, layer_classes, translate

MODEL_SUFFIXES = (".h5", ".keras", ".hdf5")
SAVEDMODEL_TIMEOUT = 600.0  # seconds for tf_keras to re-save a SavedModel or Keras 2 .keras file as H5


def find_model(model_path: Path, model_name: str) -> Path:
    """NAME.h5 (the paper's layout), NAME.keras or a SavedModel folder NAME in the folder, or the path itself."""
    if model_path.is_file() or is_savedmodel(model_path):
        return model_path
    for candidate in [model_path / f"{model_name}{suffix}" for suffix in MODEL_SUFFIXES] + [model_path / model_name]:
        if candidate.is_file() or is_savedmodel(candidate):
            return candidate
    raise DnnpipeError(f"{model_path / (model_name + '.h5')}: model file not found (nor {model_name}.keras or a "
                       f"SavedModel folder {model_name}/)")


def is_savedmodel(path: Path) -> bool:
    return path.is_dir() and (path / "saved_model.pb").is_file()


def find_any_model(model_path: Path, model_name: str) -> Path:
    """The Keras model (find_model), else NAME.tflite: a TFLite file is a model too (its operators the units)."""
    from ..slicing.tflite_model import find_tflite

    try:
        return find_model(model_path, model_name)
    except DnnpipeError:
        tflite = find_tflite(model_path, model_name)
        if tflite is None:
            raise
        return tflite


def load_keras_model(path: Path, custom_objects: Path | None = None):
    """The model as a functional Keras 3 model, whatever format and Keras version wrote it."""
    from .graph import as_functional

    objects = read_custom_objects(custom_objects) if custom_objects is not None else {}
    with native_stderr_captured():
        if is_savedmodel(path) or _is_keras2_archive(path):
            with tempfile.TemporaryDirectory(prefix="dnnpipe-resave-") as folder:
                model = _load_h5(_resaved_as_h5(path, Path(folder)), objects, shown=path)
        elif zipfile.is_zipfile(path):
            model = _load_keras_file(path, objects)
        else:
            model = _load_h5(path, objects, shown=path)
    return as_functional(model)


def read_custom_objects(path: Path) -> dict[str, Any]:
    """The public classes and functions a Python file defines, by name (its decorators register theirs)."""
    if path.suffix != ".py" or not path.is_file():
        raise DnnpipeError(f"{path}: --custom-objects takes a Python file (.py) defining the model's custom layers")
    import_tensorflow()  # the module will import keras; quietly first
    spec = importlib.util.spec_from_file_location(f"dnnpipe_custom_objects_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise DnnpipeError(f"{path}: cannot import this file as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error, reported in one line
        raise DnnpipeError(f"{path}: importing the custom objects failed ({type(e).__name__}: {_first_line(e)})"
                           ) from None
    return {name: value for name, value in vars(module).items() if not name.startswith("_") and callable(value)}


def _load_h5(path: Path, objects: dict[str, Any], shown: Path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            version = _text(f.attrs.get("keras_version"))
            raw = _text(f.attrs.get("model_config"))
    except OSError as e:
        raise DnnpipeError(f"{shown}: cannot load the Keras model (not an HDF5 or .keras file: {_first_line(e)})"
                           ) from None
    if raw is None:
        raise DnnpipeError(f"{shown}: holds weights only (no model config); save the whole model with model.save()")
    try:
        config = json.loads(raw)
        translated = translate(config) if is_keras2(version) else None
    except ValueError as e:  # malformed JSON, or a Keras 2 layer without a Keras 3 form (LegacyModelError)
        raise DnnpipeError(f"{shown}: {_first_line(e)}") from None
    if translated is None:
        return _keras_load(path, objects, shown, config)
    with tempfile.TemporaryDirectory(prefix="dnnpipe-load-") as folder:
        copy = Path(folder) / "model.h5"
        shutil.copyfile(path, copy)
        with h5py.File(copy, "r+") as f:
            f.attrs["model_config"] = json.dumps(translated)
        model = _keras_load(copy, objects, shown, translated, keras2=True)
    check_against_file(model, path, shown)
    return model


def _load_keras_file(path: Path, objects: dict[str, Any]):
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DnnpipeError(f"{path}: cannot load the Keras model (not a .keras archive: {_first_line(e)})") from None
    return _keras_load(path, objects, path, config)


def _keras_load(path: Path, objects: dict[str, Any], shown: Path, config: dict[str, Any], keras2: bool = False):
    """Keras 3's loader, after checking that every layer class is known (and, for Keras 2, no Lambda bytecode)."""
    _, keras = import_tensorflow()
    from .tfop import CUSTOM_OBJECTS

    objects = {**CUSTOM_OBJECTS, **objects}
    registered = set(keras.saving.get_custom_objects())
    known = set(dir(keras.layers)) | MODELS | set(objects) | registered | {n.split(">")[-1] for n in registered}
    for layer, class_name in layer_classes(config):
        if keras2 and class_name == "Lambda" and "Lambda" not in objects:
            raise DnnpipeError(f"{shown}: layer {layer!r} is a Lambda layer; {_hint(class_name)}")
        if class_name not in known and class_name.split(">")[-1] not in known:
            raise DnnpipeError(f"{shown}: layer {layer!r} is of class {class_name!r}, which Keras 3 does not know; "
                               f"{_hint(class_name)}")
    try:
        return keras.models.load_model(path, custom_objects=objects, compile=False)
    except Exception as e:  # Keras raises many types for unreadable files; one message for all
        raise DnnpipeError(f"{shown}: cannot load the Keras model ({type(e).__name__}: {_first_line(e)}); "
                           f"if it has custom layers, pass --custom-objects FILE.py defining them") from None


def _hint(class_name: str) -> str:
    if class_name == "Lambda":
        return ("its Python bytecode is not loaded (unsafe, and tied to the Python that wrote it): rebuild the "
                "model with a layer class in its place, or pass --custom-objects FILE.py defining a layer class "
                "named Lambda that does its work")
    if class_name == "TensorFlowOpLayer":
        return "re-save the model with TensorFlow 2.4 or later, which writes raw TensorFlow calls as TFOpLambda"
    return f"pass --custom-objects FILE.py defining class {class_name.split('>')[-1]}"


def weights_in_file(path: Path) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """(layer name, [(weight name, array)]) for every layer of a whole-model H5 file, in the file's order."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        for layer in (str(_text(n)) for n in group.attrs["layer_names"]):
            names = [str(_text(n)) for n in group[layer].attrs.get("weight_names", [])]
            yield layer, [(name, np.asarray(group[layer][name])) for name in names]


def check_against_file(model, path: Path, shown: Path) -> None:
    """Same layers in the same order (so the same units) and every weight with its name, shape and value."""
    import numpy as np

    try:
        stored = list(weights_in_file(path))
    except (KeyError, OSError) as e:
        raise DnnpipeError(f"{shown}: the file's weights cannot be read ({_first_line(e)})") from None
    loaded = [layer.name for layer in model.layers]
    if [name for name, _ in stored] != loaded:
        raise DnnpipeError(f"{shown}: the loaded model has {len(loaded)} layers but the file lists {len(stored)}, "
                           f"first difference at {_first_difference([n for n, _ in stored], loaded)}")
    for layer, (name, weights) in zip(model.layers, stored):
        variables = [*layer.trainable_weights, *layer.non_trainable_weights]
        if len(variables) != len(weights):
            raise DnnpipeError(f"{shown}: layer {name!r} has {len(weights)} weights in the file but "
                               f"{len(variables)} once loaded")
        for variable, (weight_name, value) in zip(variables, weights):
            short = weight_name.split("/")[-1].split(":")[0]
            if variable.name not in (short, WEIGHT_RENAMES.get(short)) or tuple(variable.shape) != value.shape:
                raise DnnpipeError(f"{shown}: layer {name!r} weight {weight_name} {value.shape} was loaded as "
                                   f"{variable.name} {tuple(variable.shape)}")
            if not np.array_equal(np.asarray(variable), value):
                raise DnnpipeError(f"{shown}: layer {name!r} weight {weight_name} differs from the file once loaded")


def _is_keras2_archive(path: Path) -> bool:
    """A .keras file written by tf.keras 2.13 or later (or tf_keras): its classes live in tf_keras modules."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return is_keras2(json.loads(archive.read("metadata.json")).get("keras_version"))
    except (KeyError, ValueError, zipfile.BadZipFile):
        return False


def _resaved_as_h5(folder: Path, work: Path) -> Path:
    """tf_keras (optional) reads a Keras 2 SavedModel or .keras file and writes it as H5, in a child process."""
    if is_savedmodel(folder) and not (folder / "keras_metadata.pb").is_file():
        raise DnnpipeError(f"{folder}: a SavedModel without a Keras model inside (no keras_metadata.pb), e.g. from "
                           f"model.export(); partition the .keras or .h5 file it was exported from")
    if importlib.util.find_spec("tf_keras") is None:
        raise DnnpipeError(f"{folder}: reading a tf.keras SavedModel or .keras file needs the tf_keras package "
                           f"(pip install tf_keras), or save the model as .h5 with TensorFlow 2")
    target = work / "model.h5"
    command = [sys.executable, "-m", "dnnpipe.partition.resave", str(folder), str(target)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SAVEDMODEL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DnnpipeError(f"{folder}: tf_keras did not read the model within {SAVEDMODEL_TIMEOUT:g} s"
                           ) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()] or ["no output"]
        raise DnnpipeError(f"{folder}: tf_keras cannot read the model ({lines[-1].strip()}); save it as .h5 with "
                           f"TensorFlow 2 instead")
    return target


def _text(value: Any) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else (None if value is None else str(value))


def _first_line(e: BaseException) -> str:
    """The message's first line; for Keras's 'Error when deserializing class X' the class and the cause."""
    text = str(e).strip()
    if "Exception encountered:" in text and text.startswith("Error when deserializing class"):
        text = f"{text.split(' using config', 1)[0]}: {text.split('Exception encountered:', 1)[1].strip()}"
    line = text.splitlines()[0] if text else "no detail"
    return line if len(line) <= 300 else line[:297] + "..."


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"position {i + 1}: {x!r} in the file, {y!r} loaded"
    return f"position {min(len(a), len(b)) + 1}"

