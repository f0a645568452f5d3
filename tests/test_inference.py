"""cordseg.inference: the ONNX metadata contract, model folders, and predict() in every layout.

Tiny one-node models (tests/conftest.py) stand in for trained ones; the shipped models are checked for
their metadata only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cordseg.errors import CordsegError, ModelError
from cordseg.inference import (
    CONTRASTS,
    REQUIRED_KEYS,
    TASKS,
    Model,
    find_model,
    list_models,
    model_dirs,
    read_metadata,
)

SHIPPED = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """An empty CORDSEG_MODEL_DIR (searched before the shipped models)."""
    d = tmp_path / "user_models"
    d.mkdir()
    monkeypatch.setenv("CORDSEG_MODEL_DIR", str(d))
    return d


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- metadata


def test_open_parses_every_field(tmp_path, tiny_onnx):
    path = tiny_onnx(tmp_path / "ctr.onnx", op="sigmoid", task="centerline",
                     extra={"cordseg_normalisation_params": "51.1,57.4", "cordseg_training": "a tiny test model"})
    m = Model.open(path)
    assert m.path == path
    assert m.task == "centerline"
    assert m.contrasts == ("t1", "t2", "t2s", "dwi")
    assert m.layout == "NHWC"
    assert m.patch_shape is None  # "slice": fully convolutional
    assert m.voxel_size == (1.0, 1.0, None)  # "native" keeps the input's slice thickness
    assert m.normalisation == "percentile_slices"
    assert m.normalisation_params == "51.1,57.4"
    assert m.threshold == 0.5
    assert m.size_multiple == 4
    text = m.describe()
    assert "ctr.onnx" in text and "centerline" in text and "a tiny test model" in text


def test_open_parses_3d_patch_shape_and_defaults(tmp_path, tiny_onnx):
    meta = {k: v for k, v in
            {"cordseg_task": "lesion", "cordseg_contrast": " t2s , t2 ", "cordseg_layout": "NCXYZ",
             "cordseg_patch_shape": "48x48x32", "cordseg_voxel_size": "0.5,0.5,0.5",
             "cordseg_normalisation": "zscore_stack", "cordseg_threshold": "0.1"}.items()}
    m = Model.open(tiny_onnx(tmp_path / "les.onnx", input_shape=("N", 1, 48, 48, 32), metadata=meta))
    assert m.patch_shape == (48, 48, 32)
    assert m.contrasts == ("t2s", "t2")  # spaces around commas do not matter
    assert m.voxel_size == (0.5, 0.5, 0.5)
    assert m.threshold == pytest.approx(0.1)
    assert m.size_multiple == 1  # absent -> any size
    assert m.normalisation_params is None
    assert m.min_lesion_contrast == 0.0 and "screening" not in m.describe()  # absent -> no screening
    meta["cordseg_min_lesion_contrast"] = "1.1"
    m3 = Model.open(tiny_onnx(tmp_path / "les2.onnx", input_shape=("N", 1, 48, 48, 32), metadata=meta))
    assert m3.min_lesion_contrast == pytest.approx(1.1) and "screening min contrast 1.1" in m3.describe()
    m2 = Model.open(tiny_onnx(tmp_path / "ctr80.onnx", task="centerline", extra={"cordseg_patch_shape": "80x80"}))
    assert m2.patch_shape == (80, 80)


def test_model_without_metadata_is_refused(tmp_path, tiny_onnx):
    path = tiny_onnx(tmp_path / "plain.onnx", metadata={})
    with pytest.raises(ModelError, match="not a cordseg model"):
        Model.open(path)
    assert issubclass(ModelError, CordsegError)


def test_model_missing_one_key_names_it(tmp_path, tiny_onnx):
    meta = {k: v for k, v in
            {"cordseg_task": "sc", "cordseg_contrast": "t2", "cordseg_layout": "NXYZC",
             "cordseg_patch_shape": "64x64x48", "cordseg_voxel_size": "0.5,0.5,1",
             "cordseg_normalisation": "zscore_stack"}.items()}  # no threshold
    with pytest.raises(ModelError, match="cordseg_threshold"):
        Model.open(tiny_onnx(tmp_path / "nothr.onnx", metadata=meta))


def test_missing_and_unreadable_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Model.open(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(ModelError):
        read_metadata(junk)
    with pytest.raises(ModelError):
        Model.open(junk)


def test_metadata_reader_agrees_with_onnx(tiny_onnx, tmp_path):
    """The runtime's own protobuf reader returns what the onnx package reads, for every shipped file and for
    a file with unusual values (empty, non-ASCII)."""
    onnx = pytest.importorskip("onnx")
    meta = {"cordseg_task": "sc", "cordseg_training": "Zürich, 2×GPU", "empty": ""}
    files = sorted(SHIPPED.glob("*.onnx")) + [tiny_onnx(tmp_path / "odd.onnx", metadata=meta)]
    for path in files:
        expected = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert read_metadata(path) == expected, path.name
    assert read_metadata(files[-1])["cordseg_training"] == "Zürich, 2×GPU"


def test_truncated_model_file_is_refused(tmp_path):
    whole = sorted(SHIPPED.glob("*.onnx"))[0].read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        read_metadata(cut)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        read_metadata(empty)


def test_shipped_models_carry_the_whole_contract():
    found = {m.path.name: m for m in list_models() if m.path.parent.resolve() == SHIPPED.resolve()}
    assert {m.task for m in found.values()} == set(TASKS), f"shipped models: {sorted(found)}"
    for m in found.values():
        assert all(k in m.metadata for k in REQUIRED_KEYS)
        assert set(m.contrasts) <= set(CONTRASTS) and m.contrasts
        assert m.layout in ("NHWC", "NXYZC", "NCXYZ")
        assert 0.0 < m.threshold < 1.0
        assert all(v is None or v > 0 for v in m.voxel_size)
        if m.task == "centerline":
            assert m.patch_shape is None  # CNN1 runs on whole slices
        else:
            assert m.patch_shape is not None and len(m.patch_shape) == 3
        assert m.metadata.get("cordseg_training"), "every model says how it was trained"
        # the lesion model screens its lesions (t2/t2s lesions are brighter than the cord around them, measured
        # against the same places above and below); the others don't, and only it takes the anomaly channel
        assert m.min_lesion_contrast == (1.12 if m.task == "lesion" else 0.0)
        assert m.contract.lesion_contrast == ("adaptive" if m.task == "lesion" else "slice")
        assert m.contract.lesion_edge == ((0.5, 0.1) if m.task == "lesion" else ())
        if m.task == "lesion":  # what `cordseg models` says of it
            assert "the scan's own bar (at least 1.05; 1.12 where it sets none)" in m.describe()
            assert "grown to the local edge 0.5:0.1" in m.describe()
        assert m.channels == (("image", "cord_anomaly") if m.task == "lesion" else ("image",))


# --------------------------------------------------------------------------- finding models


def test_model_dir_env_comes_first(model_dir):
    dirs = model_dirs()
    assert dirs[0] == model_dir
    assert any(d.resolve() == SHIPPED.resolve() for d in dirs)


def test_find_model_by_task_and_contrast(model_dir, tiny_onnx):
    tiny_onnx(model_dir / "my_ctr.onnx", task="centerline", extra={"cordseg_contrast": "t2"})
    tiny_onnx(model_dir / "my_sc.onnx", task="sc", input_shape=("N", 64, 64, 48, 1),
              extra={"cordseg_contrast": "dwi"})
    (model_dir / "broken.onnx").write_bytes(b"not onnx")  # skipped, not fatal
    (model_dir / "foreign.onnx").write_bytes(b"")
    assert find_model("centerline", "t2").path == model_dir / "my_ctr.onnx"  # the user's model wins
    assert find_model("centerline", "t1").path.parent.resolve() == SHIPPED.resolve()  # falls back
    assert find_model("sc", "dwi").path == model_dir / "my_sc.onnx"  # shipped sc does not serve dwi
    assert find_model("sc", "t2").path.parent.resolve() == SHIPPED.resolve()
    with pytest.raises(ModelError, match="'lesion'.*'t1'"):
        find_model("lesion", "t1")
    names = [m.path.name for m in list_models()]
    assert "my_ctr.onnx" in names and "my_sc.onnx" in names and "broken.onnx" not in names


def test_find_model_several_dirs_in_env(tmp_path, monkeypatch, tiny_onnx):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_onnx(a / "ctr_a.onnx", task="centerline", extra={"cordseg_contrast": "dwi"})
    tiny_onnx(b / "ctr_b.onnx", task="centerline", extra={"cordseg_contrast": "t1"})
    import os

    monkeypatch.setenv("CORDSEG_MODEL_DIR", f"{a}{os.pathsep}{b}")
    assert find_model("centerline", "dwi").path == a / "ctr_a.onnx"
    assert find_model("centerline", "t1").path == b / "ctr_b.onnx"


def test_find_model_with_explicit_path(tmp_path, tiny_onnx):
    path = tiny_onnx(tmp_path / "x.onnx", task="centerline")
    assert find_model("centerline", "t2", path).path == path
    # an explicit file is used whatever contrast it declares, but its task must match
    with pytest.raises(ModelError, match="'centerline' model, not a 'sc' model"):
        find_model("sc", "t2", path)
    with pytest.raises(ModelError, match="not found"):
        find_model("sc", "t2", tmp_path / "missing.onnx")


# --------------------------------------------------------------------------- predict


def test_predict_nhwc_dynamic_slices(tmp_path, tiny_onnx):
    m = Model.open(tiny_onnx(tmp_path / "s.onnx", op="sigmoid", task="centerline"), threads=1)
    rng = np.random.default_rng(0)
    for shape in [(1, 8, 12), (3, 20, 16)]:
        x = rng.normal(size=shape).astype(np.float32) * 3
        y = m.predict(x)
        assert y.shape == shape and y.dtype == np.float32
        np.testing.assert_allclose(y, sigmoid(x), rtol=1e-5, atol=1e-6)
    assert m.session() is m.session()  # created once, reused


@pytest.mark.parametrize("layout, input_shape", [
    ("NXYZC", ("N", 4, 5, 6, 1)),
    ("NCXYZ", ("N", 1, 4, 5, 6)),
])
def test_predict_3d_layouts(tmp_path, tiny_onnx, layout, input_shape):
    # fixed spatial dims: onnxruntime refuses the input unless predict() lays it out as declared
    path = tiny_onnx(tmp_path / f"{layout}.onnx", op="identity", task="sc", input_shape=input_shape,
                     extra={"cordseg_layout": layout, "cordseg_patch_shape": "4x5x6"})
    m = Model.open(path)
    x = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)  # every voxel distinct
    y = m.predict(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, x)  # voxel order survives the channel axis round trip


def test_unknown_layout_is_refused_when_the_model_is_opened(tmp_path, tiny_onnx):
    path = tiny_onnx(tmp_path / "odd.onnx", task="sc", input_shape=("N", 4, 5, 6, 1),
                     extra={"cordseg_layout": "NZYXC"})
    with pytest.raises(ModelError, match="odd.onnx: metadata cordseg_layout = 'NZYXC'"):
        Model.open(path)


def test_predict_refuses_input_the_model_rejects(tmp_path, tiny_onnx):
    # metadata says NXYZC but the graph takes NCXYZ: a ModelError naming the file, not an onnxruntime error
    m = Model.open(tiny_onnx(tmp_path / "mislabelled.onnx", task="sc", input_shape=("N", 1, 4, 5, 6)))
    with pytest.raises(ModelError, match="mislabelled.onnx"):
        m.predict(np.zeros((1, 4, 5, 6), np.float32))


@pytest.mark.parametrize("layout, input_shape", [("NHWC", ("N", "H", "W", 1)), ("NXYZC", ("N", "X", "Y", "Z", 1))])
def test_flip_average_undoes_its_flip(tmp_path, tiny_onnx, layout, input_shape):
    """With an identity model the mirrored run, flipped back, is the input again: the average equals it."""
    task = "centerline" if layout == "NHWC" else "sc"
    m = Model.open(tiny_onnx(tmp_path / f"id_{layout}.onnx", task=task, input_shape=input_shape,
                             extra={"cordseg_layout": layout}))
    x = np.random.default_rng(1).normal(size=(2, 6, 5) if layout == "NHWC" else (2, 6, 5, 4)).astype(np.float32)
    y = m.predict(x, flip_average=True)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)


def test_a_signal_during_the_runtime_import_is_an_interrupt_not_a_missing_package(monkeypatch):
    """onnxruntime's extension turns an interrupt raised by a signal handler during its import into
    ImportError("initialization failed"): that must unwind as the interrupt (exit 143 on SIGTERM), not be
    reported as a missing package. A real ImportError still is."""
    import builtins

    model = find_model("sc", "t2")
    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "onnxruntime":
            try:
                raise KeyboardInterrupt("SIGTERM")
            except KeyboardInterrupt:
                raise ImportError("initialization failed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(model, "_session", None)
    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        model.session()
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "onnxruntime" else real_import(name, *a, **k))
    with pytest.raises(ModelError, match="onnxruntime is not installed"):
        model.session()
