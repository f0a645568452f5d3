"""The model contract (cordseg.contract.ModelContract): parsed and checked once, when a model is opened;
a bad value is a ModelError naming its key; the same class writes the metadata."""
import dataclasses

import numpy as np
import pytest

import cordseg
from cordseg.contract import CENTERLINE_SLICE_MM, SECOND_LOOK_MM, ModelContract
from cordseg.errors import ModelError
from cordseg.inference import Model, find_model, read_metadata
from cordseg.phantom import make_phantom


def _meta(task="sc", **changes):
    from conftest import BASE_METADATA

    meta = dict(BASE_METADATA[task])
    meta.update(changes)
    return meta


@pytest.mark.parametrize("key, value", [
    ("cordseg_threshold", "x"),
    ("cordseg_threshold", "1.5"),
    ("cordseg_threshold", "0"),
    ("cordseg_threshold", "nan"),
    ("cordseg_patch_shape", "64x64"),       # two axes for a 3D layout
    ("cordseg_patch_shape", "64x64xa"),
    ("cordseg_patch_shape", "64x0x48"),
    ("cordseg_patch_shape", ""),
    ("cordseg_voxel_size", "0.5,0.5"),
    ("cordseg_voxel_size", "0.5,-1,1"),
    ("cordseg_voxel_size", "0.5,big,1"),
    ("cordseg_task", "brain"),
    ("cordseg_contrast", "flair"),
    ("cordseg_contrast", ""),
    ("cordseg_layout", "NZYXC"),
    ("cordseg_normalisation", "magic"),
    ("cordseg_size_multiple", "four"),
    ("cordseg_size_multiple", "0"),
    ("cordseg_min_lesion_contrast", "-1"),
    ("cordseg_lesion_contrast", "global"),
    ("cordseg_lesion_contrast_floor", "-0.5"),
    ("cordseg_lesion_contrast_floor", "high"),
    ("cordseg_lesion_edge", "0.5"),
    ("cordseg_lesion_edge", "0.5:1.2"),
    ("cordseg_lesion_edge", "half:0.1"),
    ("cordseg_second_look_mm", "wide"),
    ("cordseg_centerline_slice_mm", "-2"),
    ("cordseg_channels", "cord_anomaly"),          # the image must come first
    ("cordseg_channels", "image,t1_map"),
    ("cordseg_channels", "image,image"),
    ("cordseg_channels", ""),
    ("cordseg_contrast_thresholds", "dwi"),         # no value
    ("cordseg_contrast_thresholds", "dwi:low"),
    ("cordseg_contrast_thresholds", "dwi:1.2"),
    ("cordseg_contrast_thresholds", "flair:0.2"),   # a contrast the model does not serve
    ("cordseg_contrast_thresholds", "t2:0.2,t2:0.3"),
])
def test_bad_value_is_refused_naming_its_key(key, value):
    with pytest.raises(ModelError, match=f"bad.onnx: metadata {key} = "):
        ModelContract.from_metadata(_meta(**{key: value}), "bad.onnx")


def test_published_scheme_needs_its_parameters():
    with pytest.raises(ModelError, match="cordseg_normalisation_params"):
        ModelContract.from_metadata(_meta(cordseg_normalisation="published_ctr"), "p.onnx")
    with pytest.raises(ModelError, match="cordseg_normalisation_params"):
        ModelContract.from_metadata(_meta(cordseg_normalisation="published_ctr",
                                          cordseg_normalisation_params="1,x"), "p.onnx")
    c = ModelContract.from_metadata(_meta(cordseg_normalisation="published_ctr",
                                          cordseg_normalisation_params="51.1,57.4"), "p.onnx")
    assert c.normalisation_params == "51.1,57.4"


def test_bad_model_file_is_refused_when_opened_not_midway(tmp_path, tiny_onnx, monkeypatch):
    """A shipped-looking cord model with threshold "x": the API fails with a ModelError naming the key before
    any network runs (before, float("x") raised a ValueError in the middle of the run)."""
    model_dir = tmp_path / "models"
    tiny_onnx(model_dir / "ctr.onnx", task="centerline", op="sigmoid")
    tiny_onnx(model_dir / "sc.onnx", task="sc", op="sigmoid", extra={"cordseg_threshold": "x"})
    monkeypatch.setenv("CORDSEG_MODEL_DIR", str(model_dir))
    ran = []
    monkeypatch.setattr(Model, "predict", lambda self, *a, **k: ran.append(self.task))
    with pytest.raises(ModelError, match="cordseg_threshold = 'x'"):
        cordseg.segment_cord(make_phantom().image, "t2")
    assert ran == []


def test_round_trip_of_every_shipped_model():
    for model in cordseg.inference.list_models():
        meta = read_metadata(model.path)
        assert model.contract.to_metadata() == meta, model.path.name


def test_optional_keys_default_and_are_written_only_when_changed():
    c = ModelContract.from_metadata(_meta("centerline"), "ctr.onnx")
    assert (c.second_look_mm, c.centerline_slice_mm) == (SECOND_LOOK_MM, CENTERLINE_SLICE_MM) == (56.0, 2.0)
    assert "cordseg_second_look_mm" not in c.to_metadata()
    wider = dataclasses.replace(c, second_look_mm=80.0, centerline_slice_mm=3.0)
    meta = wider.to_metadata()
    assert (meta["cordseg_second_look_mm"], meta["cordseg_centerline_slice_mm"]) == ("80", "3")
    assert ModelContract.from_metadata(meta, "ctr.onnx") == wider
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.threshold = 0.7


def test_constructed_contract_is_checked_too():
    with pytest.raises(ModelError, match="cordseg_threshold"):
        ModelContract(task="sc", contrasts=("t2",), layout="NXYZC", patch_shape=(8, 8, 8),
                      voxel_size=(0.5, 0.5, 1.0), normalisation="zscore_stack", threshold=2.0)


def test_second_look_comes_from_the_model(tmp_path, tiny_onnx, monkeypatch):
    """cordseg_second_look_mm 0 turns the second CNN1 pass off: half the CNN1 calls of the default."""
    from cordseg import centerline
    from cordseg.orientation import to_rpi

    rpi = to_rpi(make_phantom().image)
    counts = []
    for extra in ({}, {"cordseg_second_look_mm": "0"}):
        path = tiny_onnx(tmp_path / f"ctr{len(counts)}.onnx", task="centerline", op="sigmoid", extra=extra)
        model = Model.open(path)
        calls = []
        monkeypatch.setattr(centerline, "_windows", lambda *a, **k: calls.append(1) or np.zeros(a[0].shape))
        try:
            centerline.detect(rpi, model)
        except cordseg.NoCordError:
            pass
        counts.append(len(calls))
    assert counts[0] >= 1 and counts[1] == 0


def test_find_model_refuses_a_malformed_shipped_file(tmp_path, tiny_onnx, monkeypatch):
    tiny_onnx(tmp_path / "sc.onnx", task="sc", extra={"cordseg_patch_shape": "64x64"})
    monkeypatch.setenv("CORDSEG_MODEL_DIR", str(tmp_path))
    with pytest.raises(ModelError, match="cordseg_patch_shape"):
        find_model("sc", "t2")


def test_cli_refuses_a_bad_model_in_one_line(tmp_path, tiny_onnx):
    import nibabel as nib
    from clirun import cli_runner

    from cordseg.cli import main

    image = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(make_phantom((32, 32, 8), seed=0).image, image)
    bad = tiny_onnx(tmp_path / "bad_sc.onnx", task="sc", extra={"cordseg_threshold": "x"})
    runner = cli_runner()
    result = runner.invoke(main, ["sc", str(image), "-o", str(tmp_path), "--model", str(bad), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr == "cordseg: error: bad_sc.onnx: metadata cordseg_threshold = 'x' is malformed (a number " \
                            "between 0 and 1)\n"


def test_input_channels_round_trip_and_need_the_channels_last_layout():
    c = ModelContract.from_metadata(_meta("lesion", cordseg_channels="image,cord_anomaly"), "l.onnx")
    assert c.channels == ("image", "cord_anomaly")
    assert c.to_metadata()["cordseg_channels"] == "image,cord_anomaly"
    assert "cordseg_channels" not in ModelContract.from_metadata(_meta("lesion"), "l.onnx").to_metadata()
    with pytest.raises(ModelError, match="cordseg_channels"):
        ModelContract.from_metadata(_meta("lesion", cordseg_layout="NCXYZ", cordseg_channels="image,cord_anomaly"),
                                    "l.onnx")


def test_a_contrast_may_have_its_own_threshold(tmp_path, tiny_onnx):
    meta = _meta("sc", cordseg_contrast="t2,dwi", cordseg_threshold="0.5", cordseg_contrast_thresholds="dwi:0.2")
    c = ModelContract.from_metadata(meta, "sc.onnx")
    assert c.contrast_thresholds == (("dwi", 0.2),)
    assert c.to_metadata()["cordseg_contrast_thresholds"] == "dwi:0.2"
    tiny_onnx(tmp_path / "sc.onnx", metadata=meta, input_shape=("N", 64, 64, 48, 1))
    model = find_model("sc", "dwi", tmp_path / "sc.onnx")
    assert (model.threshold_for("dwi"), model.threshold_for("t2"), model.threshold_for(None)) == (0.2, 0.5, 0.5)
    assert "dwi 0.2" in model.describe()
    assert "cordseg_contrast_thresholds" not in ModelContract.from_metadata(_meta("sc"), "sc.onnx").to_metadata()


def test_adaptive_lesion_screening_and_its_floor_round_trip():
    c = ModelContract.from_metadata(_meta("lesion", cordseg_lesion_contrast="adaptive"), "l.onnx")
    assert c.lesion_contrast == "adaptive" and c.lesion_contrast_floor == pytest.approx(1.05)
    assert "cordseg_lesion_contrast_floor" not in c.to_metadata()  # the default is not written
    c = ModelContract.from_metadata(_meta("lesion", cordseg_lesion_contrast="adaptive",
                                          cordseg_lesion_contrast_floor="1.08"), "l.onnx")
    assert c.to_metadata()["cordseg_lesion_contrast_floor"] == "1.08"
    assert ModelContract.from_metadata(c.to_metadata(), "l.onnx") == c


def test_lesion_edge_growth_round_trips():
    c = ModelContract.from_metadata(_meta("lesion", cordseg_lesion_edge="0.5:0.1"), "l.onnx")
    assert c.lesion_edge == (0.5, 0.1) and c.to_metadata()["cordseg_lesion_edge"] == "0.5:0.1"
    assert "cordseg_lesion_edge" not in ModelContract.from_metadata(_meta("lesion"), "l.onnx").to_metadata()


def test_training_writes_the_shipped_lesion_models_screening():
    """`cordseg train lesion` exports the screening settings the shipped lesion model carries."""
    tasks = pytest.importorskip("cordseg.training.tasks")
    meta = tasks.metadata(tasks.TASKS["lesion"], contrast="t2,t2s", steps=1, summary="x")
    shipped = read_metadata(find_model("lesion", "t2").path)
    for key in ("cordseg_threshold", "cordseg_min_lesion_contrast", "cordseg_lesion_contrast",
                "cordseg_lesion_contrast_floor", "cordseg_lesion_edge"):
        assert meta.get(key) == shipped.get(key), key
