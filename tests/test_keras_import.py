"""import-keras on the published models in ../shared/anchors (skipped where absent), and the published
preprocessing schemes it names. Everything converted is written under tmp_path only."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cordseg.datasets import shared_anchors
from cordseg.errors import ModelError
from cordseg.inference import read_metadata
from cordseg.normalization import (HISTOGRAM_PERCENTILES, SCHEMES, histogram_standardise, normalize_with,
                                   published_ctr, published_lesion)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ANCHORS = shared_anchors()
LANDMARKS = np.array([0.0, 123.2, 226.4, 338.4, 532.3, 788.7, 1097.0, 1408.0, 1716.5, 2079.8, 2611.0])


# ----------------------------------------------------------------------------------------------------
# preprocessing schemes (pure NumPy, fast)


def test_published_ctr_rescales_clips_and_zscores():
    v = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    p2, p98 = np.percentile(v, [2, 98])
    out = published_ctr(v, "51.1417,57.4408")
    expected = (np.clip((v - p2) / (p98 - p2), 0, 1) * 255 - 51.1417) / 57.4408
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert out.min() == pytest.approx(-51.1417 / 57.4408, rel=1e-5)  # below p2 clipped to 0
    assert out.max() == pytest.approx((255 - 51.1417) / 57.4408, rel=1e-5)  # above p98 clipped to 255
    assert out.dtype == np.float32
    assert np.all(published_ctr(np.full((4, 4, 2), 7.0), (0.0, 1.0)) == 0)  # flat image: no division by 0
    with pytest.raises(ModelError, match="parameters"):
        published_ctr(v)
    with pytest.raises(ModelError):
        published_ctr(v, "1,2,3")


def test_histogram_standardisation_maps_percentiles_to_landmarks():
    v = np.random.default_rng(0).gamma(2.0, 300.0, 20000)
    out = histogram_standardise(v, LANDMARKS)
    x = np.percentile(v, HISTOGRAM_PERCENTILES)
    inner = (v >= x[0]) & (v <= x[-1])
    np.testing.assert_allclose(out[inner], np.interp(v[inner], x, LANDMARKS), rtol=1e-4, atol=1e-2)
    # the voxels at the data's percentiles 10..90 land on the landmarks
    nearest = [int(np.argmin(np.abs(v - xk))) for xk in x[1:-1]]
    np.testing.assert_allclose(out[nearest], LANDMARKS[1:-1], atol=1.0)
    # below the 1st percentile, the published map's exponential (matched to the 1..10 segment at p10)
    lo, hi = v < x[0], v > x[-1]
    assert np.all(out[lo] >= LANDMARKS[0]) and np.all(out[lo] <= LANDMARKS[1])
    # above the 99th, one matched to the 80..90 segment at p90, saturating at the last landmark
    assert np.all(out[hi] <= LANDMARKS[-1]) and np.all(out[hi] >= LANDMARKS[-3])
    order = np.argsort(v[hi])
    assert np.all(np.diff(out[hi][order]) >= -1e-3)
    # far above: the exponential tends to the last landmark without overflow
    far = histogram_standardise(np.concatenate([v, [1e7]]), LANDMARKS)[-1]
    assert far == pytest.approx(LANDMARKS[-1], abs=1e-3)


def test_histogram_standardisation_survives_ties():
    v = np.zeros(1000)
    v[600:] = np.linspace(1, 100, 400)  # 60% background at zero: several percentiles tie
    out = histogram_standardise(v, LANDMARKS)
    assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= LANDMARKS[-1] + 1e-3


def test_published_lesion_is_standardise_then_zscore():
    v = np.random.default_rng(1).gamma(2.0, 300.0, (8, 8, 8))
    params = list(LANDMARKS) + [835.592, 528.386]
    out = published_lesion(v, ",".join(map(str, params)))
    np.testing.assert_allclose(out, (histogram_standardise(v, LANDMARKS) - 835.592) / 528.386, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(normalize_with("published_lesion", v, params), out)
    assert {"published_ctr", "published_lesion"} <= set(SCHEMES)
    with pytest.raises(ModelError):
        published_lesion(v, params[:-1])


# ----------------------------------------------------------------------------------------------------
# the published models

CASES = [  # file, task, contrast, layout, patch shape, threshold, normalisation
    ("t2_ctr.h5", "centerline", "t2", "NHWC", "slice", "0.5", "published_ctr"),
    ("t2s_ctr.h5", "centerline", "t2s", "NHWC", "slice", "0.5", "published_ctr"),
    ("dwi_ctr.h5", "centerline", "dwi", "NHWC", "slice", "0.5", "published_ctr"),
    ("t2s_lesion.h5", "lesion", "t2s", "NXYZC", "48x48x48", "0.1", "published_lesion"),
    ("t2_ax_lesion.h5", "lesion", "t2", "NXYZC", "48x48x48", "0.1", "published_lesion"),
]


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    """Each import starts from a clean Keras state: run after the other training tests in one process, the
    dynamic-size CNN1 export was once refused (and fell back to 80x80) although it passes on its own."""
    keras = pytest.importorskip("keras")
    keras.backend.clear_session()
    yield


def _need(name):
    if not (ANCHORS / name).exists():
        pytest.skip(f"published model {name} not found in {ANCHORS}")
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")


@pytest.mark.parametrize("name,task,contrast,layout,patch,threshold,norm", CASES, ids=[c[0] for c in CASES])
def test_import_published_model(tmp_path, name, task, contrast, layout, patch, threshold, norm):
    _need(name)
    import onnx

    from cordseg.training import export
    from cordseg.training.keras_import import import_keras

    out = tmp_path / (Path(name).stem + ".onnx")
    res = import_keras(ANCHORS / name, out, task=task, contrast=contrast)
    assert res.path == out and out.is_file()
    assert res.onnx_diff <= 1e-4
    # the rebuilt network equals Keras' own loader (for CNN1: with the identity Lambda replaced)
    assert res.reference_diff is not None and res.reference_diff <= 1e-5
    meta = read_metadata(out)
    assert meta == res.metadata
    # a refused dynamic-size attempt says why (the known, rare fallback to the fixed size shows its cause)
    assert meta["cordseg_patch_shape"] == patch, f"dynamic-size attempts refused: {res.refusals}"
    assert (meta["cordseg_task"], meta["cordseg_contrast"], meta["cordseg_layout"]) == (task, contrast, layout)
    assert (meta["cordseg_patch_shape"], meta["cordseg_threshold"], meta["cordseg_normalisation"]) == \
        (patch, threshold, norm)
    assert meta["cordseg_source"] == f"imported from {name}"
    params = [float(p) for p in meta["cordseg_normalisation_params"].split(",")]
    dims = [d.dim_value or None for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    if task == "centerline":
        assert meta["cordseg_voxel_size"] == "0.5,0.5,native"
        assert params == {"t2": [51.1417, 57.4408], "t2s": [68.8591, 71.4659], "dwi": [55.744, 45.003]}[contrast]
        assert dims == [None, None, None, 1]  # fully convolutional: whole slices of any size (multiple of 4)
        x = np.random.default_rng(0).normal(size=(1, 96, 120, 1)).astype(np.float32)
        y = export.onnx_outputs(out.read_bytes(), x)
        assert y.shape == (1, 96, 120, 1) and 0 <= y.min() and y.max() <= 1
    else:
        assert meta["cordseg_voxel_size"] == "0.5,0.5,0.5"
        assert len(params) == 13 and params[0] == 0.0 and params[10] == 2611.0
        assert params[11:] == ({"t2s": [1011.31, 678.985], "t2": [835.592, 528.386]}[contrast])  # t2 = t2_ax
        assert dims == [None, 48, 48, 48, 1]
    assert list(tmp_path.iterdir()) == [out]  # nothing else written


def test_cli_reports_errors_in_one_line(tmp_path):
    pytest.importorskip("click")
    from click.testing import CliRunner

    from cordseg.training.keras_import import import_keras_cmd

    runner = CliRunner()
    res = runner.invoke(import_keras_cmd, [str(tmp_path / "none.h5"), "--task", "lesion", "--contrast", "t2",
                                           "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error:") and "none.h5" in res.output and res.output.count("\n") == 1
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    res = runner.invoke(import_keras_cmd, [str(bad), "--task", "sc", "--contrast", "t9", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown contrast" in res.output
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o").exists()


def test_cli_without_the_train_extra(tmp_path, monkeypatch):
    pytest.importorskip("click")
    from click.testing import CliRunner

    from cordseg.training import keras_import

    monkeypatch.setattr(keras_import, "_missing_train_extra",
                        lambda: "import-keras needs TensorFlow and tf2onnx: install cordseg[train]")
    res = CliRunner().invoke(keras_import.import_keras_cmd, ["m.h5", "--task", "sc", "--contrast", "t2", "-o",
                                                             str(tmp_path / "o.onnx")])
    assert res.exit_code == 2 and "install cordseg[train]" in res.output and res.output.count("\n") == 1
    assert keras_import.main_import_keras(["m.h5", "--task", "sc", "--contrast", "t2", "-o", "o.onnx"]) == 2


def test_wrong_task_for_the_network_is_refused(tmp_path):
    _need("dwi_ctr.h5")
    from cordseg.training.keras_import import import_keras

    with pytest.raises(ModelError, match="2D network"):
        import_keras(ANCHORS / "dwi_ctr.h5", tmp_path / "o.onnx", task="lesion", contrast="t2")
    assert not (tmp_path / "o.onnx").exists()
