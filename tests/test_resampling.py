"""cordseg.resampling: extent-preserving, separable, edge-clamped; exact where it can be."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cordseg.datasets import shared_data
from cordseg.resampling import (
    resample,
    resample_to_shape,
    resampled_affine,
    resampled_shape,
    resampled_zooms,
)

SHARED = shared_data()


def smooth_volume(shape, seed=0, sigma=3.0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap").astype(np.float32) * 10


def test_shape_formula():
    assert resampled_shape((60, 55, 52), (1, 1, 1), (0.5, 0.5, 1)) == (120, 110, 52)
    # round(n * z / new_z), halves up, never below 1
    assert resampled_shape((5, 5, 5), (1, 1, 1), (2, 2, 2)) == (3, 3, 3)  # 2.5 -> 3
    assert resampled_shape((7, 3, 1), (1, 1, 1), (2, 2, 0.5)) == (4, 2, 2)
    assert resampled_shape((4, 4, 2), (1, 1, 1), (10, 10, 100)) == (1, 1, 1)
    assert resampled_shape((45, 45, 2), (4.977778, 4.977778, 37.5), (0.5, 0.5, 37.5)) == (448, 448, 2)
    with pytest.raises(ValueError):
        resampled_shape((4, 4, 4), (1, 1, 0), (1, 1, 1))


def test_exact_zooms():
    shape, zooms = (45, 45, 2), (4.977778, 4.977778, 37.5)
    new = resampled_zooms(shape, zooms, (0.5, 0.5, 37.5))
    new_shape = resampled_shape(shape, zooms, (0.5, 0.5, 37.5))
    for n, z, m, w in zip(shape, zooms, new_shape, new):
        assert m * w == pytest.approx(n * z, rel=1e-12)  # same extent
    assert new[2] == 37.5
    assert new[0] == pytest.approx(0.5, abs=0.001)
    assert resampled_zooms((5,), (1.0,), (2.0,)) == (5 / 3,)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_constant_stays_constant(order):
    data = np.full((9, 8, 3), 4.25, np.float32)
    out = resample(data, (1.0, 1.2, 5.0), (0.5, 0.5, 5.0), order=order)
    assert out.shape == (18, 19, 3)
    assert np.allclose(out, 4.25, atol=1e-5)


def test_linear_ramp_reproduced_exactly_in_interior():
    n = 20
    x = np.arange(n, dtype=np.float64)
    data = np.broadcast_to((3.0 * x - 7.0)[:, None, None], (n, 4, 2)).astype(np.float32)
    out = resample(data, (1.0, 1.0, 1.0), (0.3, 1.0, 1.0), order=1)
    m = out.shape[0]
    coords = (np.arange(m) + 0.5) * n / m - 0.5  # the documented voxel-centre mapping
    inside = (coords >= 0) & (coords <= n - 1)
    expected = 3.0 * coords - 7.0
    assert np.allclose(out[inside, 0, 0], expected[inside], atol=1e-4)
    # Outside the first/last voxel centres the value is clamped to the edge voxel.
    assert np.allclose(out[~inside & (coords < 0), 1, 1], data[0, 0, 0])
    assert np.allclose(out[~inside & (coords > n - 1), 1, 1], data[-1, 0, 0])
    # Cubic B-splines reproduce linear functions too, a few voxels away from the
    # edges (the edge-repeat extension bends the ramp there, and the spline feels it).
    cubic = resample(data, (1.0, 1.0, 1.0), (0.3, 1.0, 1.0), order=3)
    deep = (coords >= 5) & (coords <= n - 6)
    assert np.allclose(cubic[deep, 0, 0], expected[deep], atol=2e-3)


def test_matches_scipy_zoom_grid_mode():
    # Independent check of the coordinate mapping: scipy's zoom with grid_mode=True
    # uses the same edge-aligned mapping.
    data = smooth_volume((30, 24, 10))
    out = resample(data, (1.0, 1.0, 1.0), (0.5, 0.5, 2.0), order=1)
    ref = ndimage.zoom(data, np.array(out.shape) / data.shape, order=1, mode="nearest", grid_mode=True)
    assert out.shape == ref.shape == (60, 48, 5)
    assert np.allclose(out, ref, atol=1e-4)
    out3 = resample(data, (1.0, 1.0, 1.0), (0.5, 0.5, 2.0), order=3)
    ref3 = ndimage.zoom(data, np.array(out.shape) / data.shape, order=3, mode="nearest", grid_mode=True)
    assert np.allclose(out3[6:-6, 6:-6, 1:-1], ref3[6:-6, 6:-6, 1:-1], atol=1e-3)


@pytest.mark.parametrize("order, tol_inner, tol_all", [(1, 0.015, 0.03), (3, 0.002, 0.015)])
def test_round_trip_up_then_down(order, tol_inner, tol_all):
    # Linear interpolation up then down smooths a little (0.125 x the second
    # difference for a factor 2); cubic B-splines much less.
    data = smooth_volume((24, 20, 6), seed=1, sigma=4)
    zooms, fine = (1.0, 1.0, 4.0), (0.5, 0.5, 4.0)
    up = resample(data, zooms, fine, order=order)
    assert up.shape == (48, 40, 6)
    back = resample_to_shape(up, fine, data.shape, order=order)
    assert back.shape == data.shape
    scale = np.abs(data).max()
    err = np.abs(back - data)
    assert err[1:-1, 1:-1].max() < tol_inner * scale
    assert err.max() < tol_all * scale


def test_round_trip_non_integer_ratio():
    data = smooth_volume((33, 27, 5), seed=2, sigma=4)
    zooms = (0.84, 0.84, 17.5)
    up = resample(data, zooms, (0.5, 0.5, 17.5), order=1)
    assert up.shape == (55, 45, 5)
    back = resample_to_shape(up, resampled_zooms(data.shape, zooms, (0.5, 0.5, 17.5)), data.shape)
    assert np.abs(back - data)[2:-2, 2:-2].max() < 0.02 * np.abs(data).max()


@pytest.mark.parametrize("factor", [2, 3])
def test_mask_nearest_round_trip_integer_ratio(factor):
    rng = np.random.default_rng(factor)
    mask = (rng.uniform(size=(11, 9, 4)) > 0.6).astype(np.uint8)
    up = resample(mask, (1.0, 1.0, 3.0), (1.0 / factor, 1.0 / factor, 3.0), order=0)
    assert up.dtype == np.uint8 and up.shape == (11 * factor, 9 * factor, 4)
    # Every old voxel becomes a factor x factor block.
    assert np.array_equal(up, np.repeat(np.repeat(mask, factor, 0), factor, 1))
    back = resample_to_shape(up, (1.0 / factor, 1.0 / factor, 3.0), mask.shape, order=0)
    assert back.dtype == np.uint8
    assert np.array_equal(back, mask)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_size_one_axes_survive(order):
    two = smooth_volume((45, 45, 2), seed=3)
    out = resample(two, (4.98, 4.98, 37.5), (0.5, 0.5, 37.5), order=order)
    assert out.shape == (448, 448, 2)
    assert np.allclose(out[:, :, 0].mean(), two[:, :, 0].mean(), atol=0.05 * np.abs(two).max())
    single = smooth_volume((10, 12, 1), seed=4)
    out1 = resample(single, (1, 1, 5), (0.5, 0.5, 5), order=order)
    assert out1.shape == (20, 24, 1)
    back = resample_to_shape(out1, (0.5, 0.5, 5), single.shape, order=order)
    assert back.shape == (10, 12, 1)
    # A size-1 axis upsampled is constant along it (edge-clamped).
    thick = resample(single, (1, 1, 5), (1, 1, 1), order=order)
    assert thick.shape == (10, 12, 5)
    assert np.allclose(thick, thick[:, :, :1])


def test_dtypes_and_trailing_axes():
    data = np.arange(4 * 4 * 2, dtype=np.float64).reshape(4, 4, 2)
    assert resample(data, (1, 1, 1), (0.5, 0.5, 1)).dtype == np.float64
    assert resample(data.astype(np.int16), (1, 1, 1), (0.5, 0.5, 1)).dtype == np.float32
    assert resample(data.astype(np.int16), (1, 1, 1), (0.5, 0.5, 1), order=0).dtype == np.int16
    # Only the first len(zooms) axes are resampled; channels ride along.
    chans = np.stack([data, -data], axis=-1)
    out = resample(chans, (1, 1, 1), (0.5, 0.5, 1))
    assert out.shape == (8, 8, 2, 2)
    assert np.allclose(out[..., 1], -out[..., 0])
    # Same grid: a copy, not a view.
    same = resample(data, (1, 1, 1), (1, 1, 1))
    assert np.array_equal(same, data) and not np.shares_memory(same, data)
    with pytest.raises(ValueError):
        resample(data, (1, 1, 1), (0.5, 0.5, 1), order=2)


def test_resampled_affine_maps_same_extent():
    aff = nib.affines.from_matvec(np.diag([-0.8, 0.8, 3.0]) @ np.eye(3), [10.0, -5.0, 2.0])
    shape = (10, 12, 4)
    new_shape = resampled_shape(shape, (0.8, 0.8, 3.0), (0.5, 0.5, 3.0))
    new_aff = resampled_affine(aff, shape, new_shape)
    # The outer corners of the first and last voxels coincide.
    corner_lo = nib.affines.apply_affine(aff, [-0.5, -0.5, -0.5])
    corner_hi = nib.affines.apply_affine(aff, np.array(shape) - 0.5)
    assert np.allclose(nib.affines.apply_affine(new_aff, [-0.5, -0.5, -0.5]), corner_lo)
    assert np.allclose(nib.affines.apply_affine(new_aff, np.array(new_shape) - 0.5), corner_hi)
    # A resampled ramp agrees with the affine: value at new voxel = ramp at its old position.
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], shape)
    out = resample(ramp, (0.8, 0.8, 3.0), (0.5, 0.5, 3.0))
    old = nib.affines.apply_affine(np.linalg.inv(aff) @ new_aff, [[i, 0, 0] for i in range(new_shape[0])])[:, 0]
    inside = (old >= 0) & (old <= 9)
    assert np.allclose(out[inside, 0, 0], old[inside], atol=1e-5)


# --------------------------------------------------------------------------- the pipeline's geometry, end to end

def geometry_round_trip(img, order):
    """Native -> RPI -> 0.5 mm in-plane (thickness kept) -> back -> threshold -> native."""
    from cordseg.orientation import to_rpi

    r = to_rpi(img)
    fine = (0.5, 0.5, r.zooms[2])
    up = resample(r.data, r.zooms, fine, order=order)
    assert up.shape[2] == r.shape[2]
    back = resample_to_shape(up, resampled_zooms(r.shape, r.zooms, fine), r.shape, order=order)
    return r.to_native((back >= 0.5).astype(np.uint8))


@pytest.mark.parametrize(
    "rel",
    [
        "sct_testing/t2/t2_seg-manual.nii.gz",  # PSR, 1 mm
        "sct_testing/mt/mt0_seg.nii.gz",  # 0.84 mm in-plane, 5 slices of 17 mm
        "unf01/sub-unf01_T2w_seg-manual.nii.gz",  # RAS
    ],
)
def test_real_mask_survives_the_geometry_chain(rel, tmp_path):
    from cordseg.io import load_image, save_like

    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared data file {path} is not available")
    img = load_image(path)
    mask = np.asanyarray(img.dataobj) > 0.5
    for order in (0, 1):
        out = geometry_round_trip(img, order)
        assert out.shape == img.shape
        # Measured: identical for these masks (the linear round trip could in
        # principle flip a thin voxel; t2_fake_lesion's lesion loses 1 of 163).
        assert np.array_equal(out.astype(bool), mask)
    written = save_like(out, img, tmp_path / "seg.nii.gz")
    back = nib.load(str(written))
    src = nib.load(str(path))
    assert back.shape == src.shape and np.array_equal(back.affine, src.affine)
    assert int(back.header["qform_code"]) == int(src.header["qform_code"])
    assert int(back.header["sform_code"]) == int(src.header["sform_code"])
    assert np.array_equal(np.asanyarray(back.dataobj).astype(bool), mask)


@pytest.mark.parametrize("axcodes", [("P", "S", "R"), ("R", "P", "I"), ("A", "I", "L")])
def test_phantom_cord_survives_the_geometry_chain(axcodes):
    from cordseg.phantom import make_phantom

    p = make_phantom(shape=(40, 40, 12), zooms=(0.9, 0.9, 3.0), axcodes=axcodes)
    cord = np.asanyarray(p.cord.dataobj)
    out = geometry_round_trip(p.cord, order=1)
    dice = 2 * np.sum(out & cord) / (out.sum() + cord.sum())
    assert dice > 0.98
    assert np.array_equal(geometry_round_trip(p.cord, order=0), cord)
