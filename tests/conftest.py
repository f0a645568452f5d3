"""Shared fixtures: the real data folder beside the repository, and tiny ONNX models built with onnx.helper.

The tiny models carry the cordseg_* metadata contract, so the runtime treats them like shipped models; they
exercise the plumbing (metadata, layouts, model folders, patch geometry) without depending on trained weights.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cordseg import datasets
from cordseg.contract import ModelContract


# Metadata a runtime-usable model must carry, per task (values are strings, as in the ONNX file), written by
# the runtime's own contract class.
BASE_METADATA = {
    task: ModelContract(task=task, contrasts=contrasts, layout=layout, patch_shape=patch, voxel_size=voxel,
                        normalisation=norm, threshold=0.5, size_multiple=4).to_metadata()
    for task, contrasts, layout, patch, voxel, norm in [
        ("centerline", ("t1", "t2", "t2s", "dwi"), "NHWC", None, (1.0, 1.0, None), "percentile_slices"),
        ("sc", ("t1", "t2", "t2s"), "NXYZC", (64, 64, 48), (0.5, 0.5, 1.0), "zscore_stack"),
        ("lesion", ("t2", "t2s"), "NXYZC", (48, 48, 48), (0.5, 0.5, 1.0), "zscore_stack"),
    ]
}


# Whole modules that need the train extra; single tests elsewhere carry @pytest.mark.training.
_TRAINING_MODULES = {"test_export.py", "test_keras_import.py", "test_lesion_loss.py", "test_training_real.py"}


def pytest_collection_modifyitems(config, items):
    """Markers that follow from what a test uses: the shared_data fixture makes it `realdata`; the train extra
    (TensorFlow and Keras load in seconds) makes it `training` and `slow`."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)
        if item.path.name in _TRAINING_MODULES or item.get_closest_marker("training"):
            item.add_marker(pytest.mark.training)
            item.add_marker(pytest.mark.slow)


def pytest_ignore_collect(collection_path, config):
    """With -m "not slow" (or "not training") the training modules are not even imported: importing
    TensorFlow alone would take much of the quick loop's time."""
    expr = config.getoption("markexpr", "") or ""
    if collection_path.name in _TRAINING_MODULES and ("not slow" in expr or "not training" in expr):
        return True
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository or $CORDSEG_SHARED_DATA (read-only), or skip."""
    data = datasets.shared_data()
    if not (data / "README.md").is_file():
        pytest.skip(f"shared real data not found at {data} (../shared/data beside the repository, or "
                    f"${datasets.ENV})")
    return data


def build_onnx(path, *, op="identity", input_shape=("N", "H", "W", 1), metadata=None, task=None, extra=None):
    """Write a one-node ONNX model to `path`.

    op: "identity" (y = x) or "sigmoid" (y = 1 / (1 + exp(-x))). input_shape: dims, ints or symbolic names; a
    fixed shape makes onnxruntime refuse inputs in any other layout. metadata: the whole metadata dict, or
    None for BASE_METADATA[task] updated with `extra`; pass {} for a model without cordseg metadata.
    """
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node({"identity": "Identity", "sigmoid": "Sigmoid"}[op], ["x"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(input_shape))
    graph = helper.make_graph([node], f"tiny_{op}", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cordseg-tests")
    model.ir_version = 8  # old enough for any onnxruntime the package supports
    if metadata is None:
        metadata = dict(BASE_METADATA[task or "centerline"])
        metadata.update(extra or {})
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx():
    """The builder above, as a fixture (tests call tiny_onnx(path, op=..., task=..., ...))."""
    pytest.importorskip("onnx", reason="building test models needs onnx (pip install -e '.[test]')")
    return build_onnx


@pytest.fixture(scope="module")
def psr_phantom():
    """The command-line tests' lesion-free phantom, stored P S R like the real t2: outputs must come back in
    the input's own orientation."""
    from cordseg.phantom import make_phantom

    return make_phantom((40, 40, 20), axcodes=("P", "S", "R"), seed=5)
