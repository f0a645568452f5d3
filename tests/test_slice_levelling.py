"""CNN2's input: axial slices levelled to the box's median brightness (segmentation.level_slices).

Full-field 2D scans darken towards the ends of the receive coil's reach (3-8x on the real MT scans); CNN2
normalises its patches together, so without levelling the cord went unmarked on those slices.
"""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

import cordseg
from cordseg import metrics, segmentation
from cordseg.orientation import to_rpi
from cordseg.phantom import make_phantom


def test_large_slice_differences_are_levelled_small_ones_kept():
    rng = np.random.default_rng(0)
    base = rng.uniform(50, 150, (20, 20, 1)).astype(np.float32)
    base[:2] = 0.0  # air: the box's 1st percentile, from which brightness is measured, is 0
    factors = np.array([0.1, 0.5, 1.0, 1.1, 0.9, 1.0, 4.0], np.float32)
    out = segmentation.level_slices(base * factors)
    ratio = np.median(out.reshape(-1, out.shape[2]), axis=0) / np.median(base)
    tol = segmentation.SLICE_LEVEL_TOLERANCE
    np.testing.assert_allclose(ratio[[2, 3, 4, 5]], factors[[2, 3, 4, 5]], rtol=1e-5)  # within +-25%: as is
    np.testing.assert_allclose(ratio[[0, 1]], 1 / tol, rtol=1e-5)  # dark slices brought up to the band
    np.testing.assert_allclose(ratio[6], tol, rtol=1e-5)  # a bright one brought down to it
    assert segmentation.level_slices(np.zeros((4, 4, 3), np.float32)).max() == 0  # blank: untouched


def shaded_phantom():
    """A 4 mm-slice T2 phantom whose slices 1-3 and 20-22 fade to a tenth of the signal, noise unchanged."""
    ph = make_phantom((64, 64, 24), (0.8, 0.8, 4.0), seed=2, noise=0.1)
    rpi = to_rpi(ph.image)
    gain = np.ones(rpi.shape[2], np.float32)
    gain[1:4] = [0.1, 0.2, 0.4]
    gain[20:23] = [0.4, 0.2, 0.1]
    img = nib.Nifti1Image(rpi.to_native(rpi.data * gain), ph.image.affine, ph.image.header)
    return img, to_rpi(ph.cord).data > 0


def dark_slice_dice(img, truth):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = to_rpi(cordseg.segment_cord(img, "t2")).data > 0
    return [metrics.dice(seg[:, :, z], truth[:, :, z]) for z in (1, 2, 3, 20, 21, 22)]


@pytest.mark.slow
def test_cord_is_found_on_faded_slices():
    img, truth = shaded_phantom()
    dice = dark_slice_dice(img, truth)
    assert min(dice) >= 0.85, f"per-slice Dice on the faded slices {np.round(dice, 2)}"  # measured 0.93-0.96


@pytest.mark.slow
def test_without_levelling_the_faded_slices_are_lost(monkeypatch):
    """The failure the levelling exists for (so the test above can fail)."""
    monkeypatch.setattr(segmentation, "SLICE_LEVEL_TOLERANCE", 1e9)
    img, truth = shaded_phantom()
    dice = dark_slice_dice(img, truth)
    assert max(dice[0], dice[-1]) <= 0.5, f"per-slice Dice {np.round(dice, 2)}"  # measured 0.0 on both


def test_levelling_ignores_offsets_and_caps_the_gain():
    rng = np.random.default_rng(1)
    base = rng.uniform(50, 150, (20, 20, 1)).astype(np.float32)
    base[:2] = 0.0
    shaded = base * np.array([0.2, 1.0, 1.0, 1.0], np.float32)
    plain = segmentation.level_slices(shaded)
    z = (shaded - shaded.mean()) / shaded.std()  # the same image z-scored: negative values, median near 0
    zl = segmentation.level_slices(z)
    np.testing.assert_allclose((zl - zl.mean()) / zl.std(), (plain - plain.mean()) / plain.std(), atol=0.1)
    nearly_empty = base * np.array([1e-4, 1.0, 1.0], np.float32)
    ratio = np.median(segmentation.level_slices(nearly_empty)[:, :, 0]) / np.median(nearly_empty[:, :, 0])
    assert ratio == pytest.approx(segmentation.SLICE_LEVEL_MAX_GAIN, rel=1e-4)
