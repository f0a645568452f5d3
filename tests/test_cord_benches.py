"""The cord benches' own procedures, on inputs with known answers: thick slices made by slab averaging (with
their header), the half-maximum DWI reference, and the simulated lumbar scan's conus."""

import nibabel as nib
import numpy as np
import pytest

from bench import dwi
from bench import thick_slices as thick


def test_thicker_slices_are_slab_means_at_the_slab_centre():
    aff = np.diag([0.8, 0.8, 1.0, 1.0])
    aff[:3, 3] = (10.0, -5.0, 2.0)
    data = np.arange(4 * 3 * 10, dtype=np.float32).reshape(4, 3, 10)
    img = nib.Nifti1Image(data, aff)
    assert thick.voxel_axis(img, "lr") == 0 and thick.voxel_axis(img, "si") == 2
    out = thick.thicken(img, 2, 3)
    assert out.shape == (4, 3, 3)  # the trailing partial block dropped
    np.testing.assert_allclose(np.asarray(out.dataobj)[..., 1], data[..., 3:6].mean(axis=2))
    np.testing.assert_allclose(out.header.get_zooms(), (0.8, 0.8, 3.0))
    # the first slice's centre is the middle of native slices 0-2: native slice 1
    np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], img.affine @ [0, 0, 1, 1])
    assert int(out.header["qform_code"]) == int(out.header["sform_code"]) == 1
    mask = nib.Nifti1Image((data % 3 == 0).astype(np.uint8), aff)
    kept = np.asarray(thick.thicken(mask, 2, 2, mask=True).dataobj)
    assert set(np.unique(kept)) <= {0, 1}


def test_thicker_slices_at_another_slab_placing():
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    data = np.arange(2 * 2 * 11, dtype=np.float32).reshape(2, 2, 11)
    img = nib.Nifti1Image(data, aff)
    out = thick.thicken(img, 2, 3, offset=2)
    assert out.shape == (2, 2, 3)  # slices 0-1 before the first slab and slice 11 after the last dropped
    np.testing.assert_allclose(np.asarray(out.dataobj)[..., 0], data[..., 2:5].mean(axis=2))
    # the first slab's centre is native slice 3
    np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], img.affine @ [0, 0, 3, 1])
    np.testing.assert_allclose(out.affine @ [0, 0, 2, 1], img.affine @ [0, 0, 9, 1])


def test_per_scan_figure_is_the_median_over_slab_placings():
    rows = [dict(image="a", subject="sct", asked_mm=3.0, dice=d, volume_ratio=v)
            for d, v in ((0.90, 0.8), (0.95, 1.0), (0.80, 0.9))]
    rows.append(dict(image="a", subject="sct", asked_mm=4.0, dice=0.5, volume_ratio=2.0))
    scan = thick.per_scan(rows, "a", 3.0)
    assert scan == dict(subject="sct", dice=pytest.approx(0.90), volume_ratio=pytest.approx(0.9), low=0.8, high=1.0)
    assert thick.per_scan(rows, "b", 3.0) is None


def test_half_maximum_reference_is_the_bright_disk():
    zooms = (0.5, 0.5, 5.0)
    x, y = np.meshgrid(np.arange(60) * 0.5, np.arange(60) * 0.5, indexing="ij")
    disk = np.hypot(x - 15, y - 14) <= 3.5
    data = np.repeat(np.where(disk, 300.0, 60.0)[:, :, None], 3, axis=2)
    data[40, 40, :] = 900  # a bright speck away from the cord is not taken
    ref = dwi.half_max_outline(data, zooms, {z: (30, 28) for z in range(3)})
    assert np.array_equal(ref[:, :, 1] > 0, disk)


@pytest.mark.slow
def test_simulated_lumbar_scan_has_its_tip_where_the_labels_end():
    from cordseg.datasets import shared_data

    from bench import conus
    data = shared_data()
    if not (data / "labelmaps/PAM50").is_dir():
        pytest.skip("needs ../shared/data/labelmaps/PAM50")
    cord, csf, bone = conus.load_template(data, above_mm=30.0)
    lab, tip = conus.draw_lumbar(cord, csf, bone, np.random.default_rng(0))
    assert not np.isin(lab[:, :, :tip], 1).any() and (lab[:, :, tip] == 1).any()
    assert (lab[:, :, : tip - 10] == 4).any(axis=(0, 1)).all()  # roots on every slice under the conus
    img, truth = conus.render(lab, np.random.default_rng(1), t1_like=False)
    assert img.shape == truth.shape and abs(conus.lowest(truth) - tip / 2) <= 1.5


def test_flip_tta_averages_only_the_named_task_over_its_flips(monkeypatch):
    from bench import tta
    from cordseg.inference import Model

    calls = []

    def plain(self, batch, *, flip_average=False):
        calls.append(flip_average)
        return batch[..., 0] if batch.ndim == 5 else batch.copy()  # a network that echoes its input

    monkeypatch.setattr(Model, "predict", plain)
    predict = tta.flip_tta("xz", "sc")
    batch = np.random.default_rng(0).random((1, 4, 3, 5)).astype(np.float32)

    class Net:
        task = "sc"

    # an echoing network is flip-equivariant: the average over flips and back gives the input again, in 4 passes
    np.testing.assert_allclose(predict(Net(), batch, flip_average=True), batch, rtol=1e-6)
    assert len(calls) == 4
    Net.task = "lesion"
    calls.clear()
    predict(Net(), batch, flip_average=True)
    assert calls == [True]  # another network runs as at run time
    with pytest.raises(SystemExit):
        tta.install("xw", "sc")
