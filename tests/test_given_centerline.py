"""A centerline the user supplies (`segment_cord(..., centerline=)`, `cordseg sc/lesion --centerline`).

Users correct the automatic centerline, or mark the cord on a few slices, where CNN1 misses it (the darkest
slices of a full-field scan); segmentation then runs along their curve.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from clirun import cli_runner

import cordseg
from cordseg import metrics
from cordseg.centerline import Centerline, from_mask
from cordseg.cli import main
from cordseg.errors import InputError
from cordseg.orientation import to_rpi
from cordseg.phantom import make_phantom


LAS_1MM = np.array([[-1.0, 0, 0, 29], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # voxel (i, j, k) -> (29 - i, j, k) mm


def line_image(shape=(30, 30, 20)):
    """A blank image stored in the working orientation (LAS, 1 mm), so native voxels are RPI voxels."""
    return nib.Nifti1Image(np.zeros(shape, np.float32), LAS_1MM)


def test_sparse_points_are_interpolated_between_marked_slices():
    img = line_image()
    rpi = to_rpi(img)
    mask = np.zeros(img.shape, np.uint8)
    mask[10, 12, 2] = 1
    mask[20, 12, 12] = 1
    mask[15, 14, 17] = 1
    mask[16, 14, 17] = 1  # two voxels on one slice: their mean
    cl = from_mask(rpi, mask, img.affine)
    np.testing.assert_array_equal(cl.z, np.arange(2, 18))
    np.testing.assert_allclose(cl.x[[0, 5, 10, 15]], [10, 15, 20, 15.5])
    np.testing.assert_allclose(cl.y[[0, 10, 15]], [12, 12, 14])


def test_mask_on_another_grid_lands_on_the_same_scanner_points():
    img = line_image()
    rpi = to_rpi(img)
    # the same field of view at 0.5 mm, stored PSR-like (axes permuted and flipped)
    fine = np.diag([0.5, 0.5, 0.5, 1.0])
    perm = np.array([[0, 0, -1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    aff = np.eye(4)
    aff[:3, :3] = (fine @ perm)[:3, :3]
    aff[:3, 3] = [29.5, 29.5, 0.0]
    shape = (40, 60, 60)
    mask = np.zeros(shape, np.uint8)
    world = np.array([[29 - 8.0, 11.0, 4.0], [29 - 18.0, 11.0, 14.0]])  # RPI voxels (8, 11, 4), (18, 11, 14)
    vox = np.rint((world - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T).astype(int)
    for v in vox:
        mask[tuple(v)] = 1
    cl = from_mask(rpi, mask, aff)
    np.testing.assert_array_equal(cl.z, np.arange(4, 15))
    np.testing.assert_allclose(cl.x[[0, -1]], [8, 18], atol=1e-6)
    np.testing.assert_allclose(cl.y, 11, atol=1e-6)


def test_empty_or_outside_masks_are_refused():
    img = line_image()
    rpi = to_rpi(img)
    with pytest.raises(InputError, match="no marked voxel"):
        from_mask(rpi, np.zeros(img.shape), img.affine)
    far = img.affine.copy()
    far[2, 3] = 500.0
    mask = np.zeros(img.shape)
    mask[5, 5, 5] = 1
    with pytest.raises(InputError, match="outside the image"):
        from_mask(rpi, mask, far)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((48, 48, 32), axcodes=("P", "S", "R"), seed=4)


def true_centerline_mask(ph, every=1):
    """The phantom's own centerline, marked on every `every`-th cord slice, on its native grid."""
    mask = np.zeros(ph.image.shape, np.uint8)
    for row in np.rint(ph.centerline[::every]).astype(int):
        mask[tuple(row)] = 1
    return nib.Nifti1Image(mask, ph.image.affine)


@pytest.mark.slow
def test_segmentation_along_a_few_marked_slices(phantom):
    sparse = true_centerline_mask(phantom, every=6)
    seg = cordseg.segment_cord(phantom.image, "t2", centerline=sparse)
    truth = np.asarray(phantom.cord.dataobj)
    d = metrics.dice(np.asarray(seg.dataobj), truth)
    assert d >= 0.88, f"Dice {d:.3f} along a centerline marked on every 6th slice"  # measured 0.93
    assert seg.shape == phantom.image.shape
    np.testing.assert_array_equal(seg.affine, phantom.image.affine)


@pytest.mark.slow
def test_no_cord_beyond_the_centerline_ends(phantom):
    """Where the centerline says the cord starts and ends, the mask does too (CNN2's patches reach past the
    ends; below the conus it would mark nerve roots)."""
    rpi = to_rpi(phantom.image)
    full = cordseg.segment_cord(phantom.image, "t2", centerline=true_centerline_mask(phantom))
    cl_full = from_mask(rpi, np.asarray(true_centerline_mask(phantom).dataobj), phantom.image.affine)
    zs = cl_full.z
    keep = (zs >= zs[0] + 8) & (zs <= zs[-1] - 8)
    part = Centerline(zs[keep], cl_full.x[keep], cl_full.y[keep], rpi)
    seg = cordseg.segment_cord(phantom.image, "t2", centerline=part)
    seg_rpi = to_rpi(seg).data
    full_rpi = to_rpi(full).data
    cord_z = np.nonzero(seg_rpi.any((0, 1)))[0]
    assert cord_z.min() >= zs[keep][0] and cord_z.max() <= zs[keep][-1]
    assert full_rpi[:, :, :zs[keep][0]].sum() > 0 and full_rpi[:, :, zs[keep][-1] + 1:].sum() > 0
    inside = slice(zs[keep][0], zs[keep][-1] + 1)
    assert metrics.dice(seg_rpi[:, :, inside], full_rpi[:, :, inside]) > 0.97


@pytest.mark.slow
def test_detected_centerline_object_gives_the_automatic_answer(phantom):
    _, cl = cordseg.detect_centerline(phantom.image, "t2")
    auto = cordseg.segment_cord(phantom.image, "t2")
    given = cordseg.segment_cord(phantom.image, "t2", centerline=cl)
    np.testing.assert_array_equal(np.asarray(given.dataobj), np.asarray(auto.dataobj))
    other = make_phantom((40, 40, 20), seed=1)
    with pytest.raises(InputError, match="another image"):
        cordseg.segment_cord(other.image, "t2", centerline=cl)


@pytest.mark.slow
def test_cli_centerline_option(tmp_path, phantom):
    img = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(phantom.image, img)
    cl = tmp_path / "cl.nii.gz"
    nib.save(true_centerline_mask(phantom, every=4), cl)
    runner = cli_runner()
    out = tmp_path / "seg.nii.gz"
    res = runner.invoke(main, ["sc", str(img), "--centerline", str(cl), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.stderr
    assert metrics.dice(np.asarray(nib.load(out).dataobj), np.asarray(phantom.cord.dataobj)) >= 0.88
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(phantom.image.shape, np.uint8), phantom.image.affine), empty)
    out2 = tmp_path / "les.nii.gz"
    res = runner.invoke(main, ["lesion", str(img), "--centerline", str(empty), "-o", str(out2)])
    assert res.exit_code == 2
    assert res.stderr.strip() == "cordseg: error: the centerline mask has no marked voxel"
    assert not out2.exists()
