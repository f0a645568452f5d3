"""CNN1's second look: a window around the first curve on every slice, normalised on its own.

With an identity "CNN1" the heatmap is the per-slice normalised image itself, so the test can build the
failure the window exists for: a bright stripe (fat near a surface coil) that sets a whole slice's
percentiles and leaves the cord too faint on those slices, while the window around the cord does not see it.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from cordseg import centerline
from cordseg.inference import Model
from cordseg.orientation import to_rpi

CORD_XY = (50, 60)
LAS_2MM = np.array([[-1.0, 0, 0, 159], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])  # stored as RPI; 2 mm slices:
# CNN1 sees them as they are (thinner ones are resampled to 2 mm)


def full_field(stripe_slices=range(5, 10)):
    """160 x 160 mm slices of 2 mm: a 4 mm-radius cord at CORD_XY on every slice, and on `stripe_slices` a
    2-voxel-wide very bright stripe along the back (1.25% of the slice: it sets the 99th percentile)."""
    data = np.full((160, 160, 10), 0.1, np.float32)
    x, y = np.mgrid[:160, :160]
    data[(x - CORD_XY[0]) ** 2 + (y - CORD_XY[1]) ** 2 <= 16] = 1.0
    for z in stripe_slices:
        data[:, 150:152, z] = 10.0
    return to_rpi(nib.Nifti1Image(data, LAS_2MM))


@pytest.fixture
def identity_cnn1(tmp_path, tiny_onnx):
    return Model.open(tiny_onnx(tmp_path / "identity_centerline.onnx", task="centerline"))


def test_whole_slices_lose_the_cord_where_the_stripe_sets_the_percentiles(identity_cnn1):
    first = centerline.detect(full_field(), identity_cnn1, window_mm=None)
    np.testing.assert_array_equal(first.z, np.arange(5))


def test_second_look_finds_it_on_every_slice(identity_cnn1):
    cl = centerline.detect(full_field(), identity_cnn1)
    np.testing.assert_array_equal(cl.z, np.arange(10))
    np.testing.assert_allclose(cl.x, CORD_XY[0], atol=0.5)
    np.testing.assert_allclose(cl.y, CORD_XY[1], atol=0.5)


def test_window_heatmap_is_zero_outside_the_windows(identity_cnn1):
    rpi = full_field()
    around = centerline.Centerline(np.arange(3), np.full(3, 50.0), np.full(3, 60.0), rpi)
    heat, zooms = centerline.window_heatmap(rpi, identity_cnn1, around, 56.0)
    assert heat.shape == rpi.shape and zooms == pytest.approx(rpi.zooms)
    inside = np.zeros(rpi.shape, bool)
    inside[22:78, 32:88, :] = True  # 56 voxels around (50, 60), also beyond the curve's last slice
    assert not heat[~inside].any()
    np.testing.assert_allclose(heat[CORD_XY[0], CORD_XY[1], :], 1.0, atol=1e-5)  # normalised per window


def test_small_images_are_looked_at_whole(identity_cnn1):
    """A window wider than the slice is the slice: the second pass then sees what the first saw."""
    data = np.full((40, 40, 6), 0.1, np.float32)
    x, y = np.mgrid[:40, :40]
    data[(x - 20) ** 2 + (y - 18) ** 2 <= 16] = 1.0
    rpi = to_rpi(nib.Nifti1Image(data, np.diag([-1.0, 1, 2, 1])))
    a = centerline.detect(rpi, identity_cnn1, window_mm=None)
    b = centerline.detect(rpi, identity_cnn1)
    np.testing.assert_array_equal(a.z, b.z)
    np.testing.assert_allclose(a.x, b.x)
    np.testing.assert_allclose(a.y, b.y)


@pytest.mark.parametrize("shape, zooms", [((64, 64, 40), (1.0, 1.0, 1.0)), ((96, 96, 20), (0.6, 0.6, 3.0))])
def test_second_look_stops_where_the_cord_stops(shape, zooms):
    """Phantoms whose cord ends inside the field of view (tissue only above and below), shipped CNN1: the
    windows run on past the first curve's ends, but the answer must not follow them into cord-free slices
    (measured, seeds 0-2: ends within 2 slices below and 0 above the cord, as with one pass)."""
    from cordseg.inference import find_model
    from cordseg.phantom import make_phantom

    ph = make_phantom(shape, zooms, cord_slices=(8, shape[2] - 6), seed=1)
    cl = centerline.detect(to_rpi(ph.image), find_model("centerline", "t2", None))
    assert ph.cord_slices.start - 2 <= cl.z.min() and cl.z.max() <= ph.cord_slices.stop - 1 + 1
    assert len(cl.z) >= 0.9 * len(ph.cord_slices)
