"""cordseg.phantom: a known cord, centerline and lesions, in any orientation and voxel size."""
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cordseg.orientation import to_rpi
from cordseg.phantom import CORD_RADII, CSF_WIDTH, make_phantom


def rpi(img):
    return to_rpi(img).data


def test_default_phantom_basics():
    p = make_phantom()
    assert p.image.shape == p.cord.shape == p.lesions.shape == (64, 64, 40)
    assert np.asanyarray(p.image.dataobj).dtype == np.float32
    assert np.asanyarray(p.cord.dataobj).dtype == np.uint8
    assert np.asanyarray(p.lesions.dataobj).dtype == np.uint8
    assert nib.aff2axcodes(p.image.affine) == ("L", "A", "S")
    assert p.image.header.get_zooms() == (1.0, 1.0, 1.0)
    assert int(p.image.header["qform_code"]) == 1 and int(p.image.header["sform_code"]) == 1
    assert p.cord_slices == range(0, 40)
    assert p.centerline.shape == (40, 3)
    assert not np.any(np.asanyarray(p.lesions.dataobj))
    assert np.all(np.asanyarray(p.image.dataobj) >= 0)


def test_fast():
    best = min(_timed(make_phantom) for _ in range(3))
    assert best < 0.5  # about 0.02 s here; the budget is loose for a busy machine


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_deterministic():
    a, b = make_phantom(seed=5, n_lesions=2), make_phantom(seed=5, n_lesions=2)
    assert np.array_equal(np.asanyarray(a.image.dataobj), np.asanyarray(b.image.dataobj))
    assert np.array_equal(np.asanyarray(a.lesions.dataobj), np.asanyarray(b.lesions.dataobj))
    assert np.array_equal(a.centerline, b.centerline)
    c = make_phantom(seed=6, n_lesions=2)
    assert not np.array_equal(np.asanyarray(a.image.dataobj), np.asanyarray(c.image.dataobj))


def test_centerline_is_the_cord_centre():
    p = make_phantom(curvature=8.0)
    cord = rpi(p.cord)
    for x, y, z in p.centerline_rpi:
        com = ndimage.center_of_mass(cord[:, :, int(z)])
        assert abs(com[0] - x) < 0.3 and abs(com[1] - y) < 0.3
    # It really curves: the lateral bow is about the asked 8 mm.
    assert 6.0 < np.ptp(p.centerline_rpi[:, 0]) <= 8.5
    # Consecutive points move smoothly.
    assert np.abs(np.diff(p.centerline_rpi[:, :2], axis=0)).max() < 1.0


def test_cord_cross_section_in_mm():
    for zooms in [(1.0, 1.0, 1.0), (0.5, 0.5, 3.0), (0.8, 0.6, 2.0)]:
        p = make_phantom(shape=(int(48 / zooms[0]), int(48 / zooms[1]), 12), zooms=zooms, curvature=4)
        cord = rpi(p.cord)
        area = cord[:, :, 6].sum() * zooms[0] * zooms[1]
        assert area == pytest.approx(np.pi * CORD_RADII[0] * CORD_RADII[1], rel=0.15)


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("P", "S", "R"), ("L", "P", "I"), ("I", "R", "P")])
def test_native_orientation(axcodes):
    ref = make_phantom(shape=(40, 36, 20), zooms=(0.8, 0.7, 2.5), n_lesions=2, seed=3)
    p = make_phantom(shape=(40, 36, 20), zooms=(0.8, 0.7, 2.5), n_lesions=2, seed=3, axcodes=axcodes)
    assert nib.aff2axcodes(p.image.affine) == axcodes
    r = to_rpi(p.image)
    assert r.zooms == pytest.approx((0.8, 0.7, 2.5))
    # Built in RPI then reoriented: going back gives the RPI phantom exactly.
    assert np.array_equal(r.data, np.asanyarray(ref.image.dataobj))
    assert np.array_equal(rpi(p.cord), np.asanyarray(ref.cord.dataobj))
    assert np.array_equal(rpi(p.lesions), np.asanyarray(ref.lesions.dataobj))
    assert np.allclose(r.affine, ref.image.affine)
    # The native centerline is the same scanner curve.
    world = nib.affines.apply_affine(p.image.affine, p.centerline)
    assert np.allclose(world, nib.affines.apply_affine(ref.image.affine, ref.centerline_rpi))
    # ... and each point sits inside the native cord mask.
    cord = np.asanyarray(p.cord.dataobj)
    idx = np.rint(p.centerline).astype(int)
    assert np.all(cord[tuple(idx.T)] == 1)


@pytest.mark.parametrize("contrast", ["t2", "t1"])
def test_contrast(contrast):
    p = make_phantom(noise=0.0, blobs=0, contrast=contrast, curvature=0.0)
    img, cord = rpi(p.image), rpi(p.cord).astype(bool)
    x, y, _ = p.centerline_rpi[20]
    yy, xx = np.meshgrid(np.arange(64), np.arange(64))
    # Elliptical radius of each in-plane voxel centre relative to the cord (1 at its edge).
    r = np.hypot((xx - x) / CORD_RADII[0], (yy - y) / CORD_RADII[1])
    r_out = np.hypot((xx - x) / (CORD_RADII[0] + CSF_WIDTH), (yy - y) / (CORD_RADII[1] + CSF_WIDTH))
    s = img[:, :, 20]
    cord_v = s[cord[:, :, 20] & (r < 0.6)].mean()
    csf_v = s[(r > 1.25) & (r_out < 0.85)].mean()
    tissue_v = s[r_out > 1.5].mean()
    if contrast == "t2":
        assert csf_v > cord_v > tissue_v
    else:
        assert cord_v > tissue_v > csf_v


def test_cord_slices_and_gaps():
    p = make_phantom(cord_slices=(8, 30), gap_slices=(15, 16), noise=0.02)
    cord = rpi(p.cord)
    img = rpi(p.image)
    assert p.cord_slices == range(8, 30)
    assert len(p.centerline) == 22 and np.array_equal(p.centerline_rpi[:, 2], np.arange(8, 30))
    per_slice = cord.sum(axis=(0, 1))
    assert np.all(per_slice[:8] == 0) and np.all(per_slice[30:] == 0)
    assert np.all(per_slice[8:30] > 20)  # the mask keeps the cord in the gap slices
    means = img.mean(axis=(0, 1))
    assert means[15] < 0.1 and means[16] < 0.1  # signal dropout
    assert means[14] > 0.3 and means[17] > 0.3
    # Slices without cord have no CSF ring either: nothing CSF-bright near the centre.
    assert img[24:40, 24:40, 3].max() < 0.6


def test_lesions():
    p = make_phantom(n_lesions=3, seed=2, noise=0.0, blobs=0)
    les = rpi(p.lesions).astype(bool)
    cord = rpi(p.cord).astype(bool)
    labels, n = ndimage.label(les)
    assert n == 3 == p.n_lesions
    assert np.all(cord[les])  # inside the cord
    sizes = ndimage.sum(les, labels, range(1, n + 1))
    assert np.all(sizes >= 5)
    img = rpi(p.image)
    assert np.allclose(img[les], 0.85)  # t2: brighter than the cord (0.55)
    with pytest.raises(ValueError, match="do not fit"):
        make_phantom(shape=(32, 32, 10), n_lesions=4)


def test_lesions_at_coarse_resolution():
    p = make_phantom(shape=(20, 20, 12), zooms=(4.0, 4.0, 5.0), n_lesions=1, seed=1)
    les = np.asanyarray(p.lesions.dataobj)
    cord = np.asanyarray(p.cord.dataobj)
    assert les.sum() >= 1 and np.all(cord[les > 0] == 1)
    assert cord[:, :, 6].sum() >= 1  # a cord thinner than a voxel still marks its centre


def test_blobs_are_distant_distractors():
    p = make_phantom(noise=0.0, blobs=4, seed=4)
    plain = make_phantom(noise=0.0, blobs=0, seed=4)
    diff = np.abs(rpi(p.image) - rpi(plain.image))
    assert diff.max() > 0.3  # there are strong blobs
    # ... and none of them touches the cord or its CSF ring.
    xs, ys = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    for x, y, z in p.centerline_rpi:
        near = np.hypot(xs - x, ys - y) < CORD_RADII[0] + CSF_WIDTH + 2
        assert diff[:, :, int(z)][near].max() < 0.05


def test_tiny_field_of_view_and_single_slice():
    p = make_phantom(shape=(12, 12, 1), zooms=(1.0, 1.0, 5.0), curvature=10.0)
    assert p.image.shape == (12, 12, 1)
    assert len(p.centerline) == 1
    assert np.asanyarray(p.cord.dataobj).sum() > 0


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_phantom(contrast="flair")
    with pytest.raises(ValueError):
        make_phantom(cord_slices=(10, 50))
    with pytest.raises(ValueError):
        make_phantom(gap_slices=(40,))
