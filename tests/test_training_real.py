"""Real-data training path: BIDS discovery and the paper's augmentation keep image and labels aligned."""
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("scipy")
from cordseg.training.augment import jitter_lesion_edges, real_patch  # noqa: E402
from cordseg.training.bids import find_labelled, find_lesion_free  # noqa: E402


def _tube_volume():
    shape = (60, 60, 40)
    gx, gy = np.mgrid[:60, :60]
    cord = np.zeros(shape, np.float32)
    for z in range(8, 36):
        cord[:, :, z] = ((gx - 30 - 0.1 * z) ** 2 + (gy - 28) ** 2) <= 16
    lesion = np.zeros(shape, np.float32)
    lesion[28:32, 26:30, 18:22] = cord[28:32, 26:30, 18:22]
    return SimpleNamespace(image=cord.copy(), cord=cord, lesion=lesion, contrast="t2",
                           cord_slices=np.nonzero(cord.any(axis=(0, 1)))[0])


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 16)])
def test_real_patch_keeps_image_and_target_aligned(shape):
    vol = _tube_volume()  # the image IS the cord mask: any misalignment shows up
    for seed in range(4):
        img, tgt = real_patch(vol, np.random.default_rng(seed), shape)
        assert img.shape == tgt.shape == shape
        assert tgt.sum() > 0
        agree = ((img >= 0.5) == (tgt >= 0.5)).mean()
        assert agree > 0.999


def test_lesion_edge_jitter_changes_only_the_border():
    vol = _tube_volume()
    out = jitter_lesion_edges(vol.lesion, np.random.default_rng(0))
    changed = out != vol.lesion
    assert out.any()
    core = vol.lesion.astype(bool)
    from scipy import ndimage as ndi

    border = ndi.binary_dilation(core) & ~ndi.binary_erosion(core)
    assert not (changed & ~border).any()


def test_bids_discovery(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    labels = tmp_path / "derivatives" / "labels" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    labels.mkdir(parents=True)
    for name in ("sub-01_T2w.nii.gz", "sub-01_T1w.nii.gz", "sub-01_T2star.nii.gz", "sub-01_acq-x_bold.nii.gz"):
        (anat / name).write_bytes(b"")
    (labels / "sub-01_T2w_seg-manual.nii.gz").write_bytes(b"")
    (labels / "sub-01_T2star_lesion-manual.nii.gz").write_bytes(b"")
    found = find_labelled(tmp_path)
    assert [(f.image.name, f.contrast, f.cord is not None, f.lesion is not None) for f in found] == [
        ("sub-01_T2star.nii.gz", "t2s", False, True), ("sub-01_T2w.nii.gz", "t2", True, False)]
    assert [f.contrast for f in find_labelled(tmp_path, ["t2"])] == ["t2"]


def _save(path, data):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), np.eye(4)), str(path))


def test_lesion_free_discovery_takes_t2_like_scans_whose_lesion_mask_marks_nothing(tmp_path):
    labels = tmp_path / "derivatives" / "labels"
    some = np.zeros((4, 4, 4))
    some[1, 1, 1] = 1
    _save(tmp_path / "sub-a/anat/sub-a_T2w.nii.gz", some)
    _save(labels / "sub-a/anat/sub-a_T2w_seg-manual.nii.gz", some)  # cord mask: a control with its reference
    _save(tmp_path / "sub-b/ses-1/anat/sub-b_ses-1_T2star.nii.gz", some)  # no mask at all
    _save(tmp_path / "sub-c/anat/sub-c_T2w.nii.gz", some)
    _save(labels / "sub-c/anat/sub-c_T2w_lesion-manual.nii.gz", some)  # a patient: not a background
    _save(tmp_path / "sub-d/anat/sub-d_acq-MTon_MTS.nii.gz", some)
    _save(tmp_path / "sub-d/anat/sub-d_acq-MTon_MTS_lesion-manual.nii.gz", np.zeros((4, 4, 4)))  # checked: none
    _save(tmp_path / "sub-e/anat/sub-e_T1w.nii.gz", some)  # lesions are dark there: not this model's
    found = find_lesion_free(tmp_path)
    assert [(f.subject, f.contrast, f.cord is not None, f.lesion) for f in found] == [
        ("sub-a", "t2", True, None), ("sub-b", "t2s", False, None), ("sub-d", "t2s", False, None)]
