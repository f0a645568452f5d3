"""cordseg.Segmenter: models opened once and asked many times, the same answers as the one-call functions,
and stage events that account for the run."""
import nibabel as nib
import numpy as np
import pytest

import cordseg
from cordseg import inference
from cordseg.errors import InputError, ModelError
from cordseg.phantom import make_phantom
from cordseg.stages import StageEvent


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((40, 40, 20), seed=3, n_lesions=2)


@pytest.fixture
def sessions(monkeypatch):
    """Counts ONNX Runtime sessions created, per model file."""
    made = []
    original = inference.Model.session

    def counting(self):
        if self._session is None:
            made.append(self.path.name)
        return original(self)

    monkeypatch.setattr(inference.Model, "session", counting)
    return made


@pytest.mark.slow
def test_sessions_are_opened_once_for_many_images(phantom, sessions):
    seg = cordseg.Segmenter("t2")
    for _ in range(2):
        seg.cord(phantom.image)
        seg.lesions(phantom.image)
        seg.centerline(phantom.image)
    assert sorted(sessions) == sorted(set(sessions)) and len(sessions) >= 2  # CNN1, cord (and lesion) once
    assert {"cordseg_centerline.onnx", "cordseg_sc.onnx", "cordseg_lesion.onnx", "cordseg_conus.onnx"} >= set(sessions)
    assert "cordseg_lesion.onnx" in sessions


@pytest.mark.slow
def test_one_call_functions_open_sessions_per_call(phantom, sessions):
    cordseg.segment_cord(phantom.image, "t2")
    cordseg.segment_cord(phantom.image, "t2")
    assert sessions.count("cordseg_sc.onnx") == 2  # what the Segmenter saves


@pytest.mark.slow
def test_same_answers_as_the_one_call_functions(phantom):
    seg = cordseg.Segmenter("t2")
    pairs = [(seg.cord(phantom.image), cordseg.segment_cord(phantom.image, "t2")),
             (seg.cord(phantom.image, soft=True), cordseg.segment_cord(phantom.image, "t2", soft=True)),
             (seg.lesions(phantom.image, min_contrast=0), cordseg.segment_lesions(phantom.image, "t2", min_contrast=0)),
             (seg.lesions(phantom.image), cordseg.segment_lesions(phantom.image, "t2")),
             (seg.centerline(phantom.image)[0], cordseg.detect_centerline(phantom.image, "t2")[0])]
    for mine, theirs in pairs:
        assert mine.shape == theirs.shape and np.allclose(mine.affine, theirs.affine)
        assert mine.get_data_dtype() == theirs.get_data_dtype()
        np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
    assert np.asarray(pairs[0][0].dataobj).any()


@pytest.mark.slow
def test_contrast_read_from_each_name(tmp_path, phantom, sessions):
    a, b = tmp_path / "sub-01_T2w.nii.gz", tmp_path / "sub-02_T1w.nii.gz"
    nib.save(phantom.image, a)
    nib.save(phantom.image, b)
    seg = cordseg.Segmenter()
    seg.cord(a)
    seg.cord(b)
    seg.cord(a)
    # the shipped models serve every contrast from one file, but each (task, contrast) is opened once
    assert sessions.count("cordseg_sc.onnx") == 2 and len(seg._models) == 6  # CNN1, cord, conus per contrast
    unnamed = nib.Nifti1Image(np.asarray(phantom.image.dataobj), phantom.image.affine)
    with pytest.raises(InputError, match="cannot tell the contrast"):
        seg.cord(unnamed)
    seg.cord(unnamed, contrast="t2")


@pytest.mark.slow
def test_stage_events_account_for_the_run(phantom):
    events = []
    seg = cordseg.Segmenter("t2", on_stage=events.append)
    seg.lesions(phantom.image, min_contrast=1.1)
    names = [e.stage for e in events]
    assert all(isinstance(e, StageEvent) and e.seconds >= 0 and e.cpu_seconds >= 0 for e in events)
    for stage in ("load", "reorient", "models", "centerline", "centerline.cnn1",  # one pass: windows = slices
                  "centerline.optic", "lesions", "lesions.cnn2", "lesions.resample", "output"):
        assert stage in names, names
    top = sum(e.seconds for e in events if "." not in e.stage)
    parts = sum(e.seconds for e in events if e.stage.startswith("centerline."))
    assert parts <= next(e.seconds for e in events if e.stage == "centerline") + 1e-3
    assert top > 0
    cord_open = ("sc", "t2") in seg._models  # opened by the screening when it had lesions to judge
    events.clear()
    seg.cord(phantom.image)
    assert [e.stage for e in events].count("models") == (0 if cord_open else 1)  # CNN1 is open already


def test_bad_arguments_and_models(phantom, tmp_path):
    with pytest.raises(InputError, match="threads"):
        cordseg.Segmenter("t2", threads=0)
    with pytest.raises(InputError, match="contrast"):
        cordseg.Segmenter("flair")
    with pytest.raises(InputError, match="threshold"):
        cordseg.Segmenter("t2").cord(phantom.image, threshold=1.5)
    with pytest.raises(ModelError, match="not found"):
        cordseg.Segmenter("t2", cord_model=tmp_path / "none.onnx").cord(phantom.image)
    assert "Segmenter" in cordseg.__all__ and cordseg.Segmenter is cordseg.api.Segmenter
