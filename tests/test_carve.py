"""Carved real-background lesion patches (training.carve) and the weights recovered from an ONNX CNN2."""
import numpy as np
import pytest

pytest.importorskip("keras")

from cordseg.training import carve  # noqa: E402


def _background(zooms=(0.9, 0.9, 5.0), shape=(60, 60, 14)):
    """A cylinder 'cord' of intensity 100 in a 40 background, running along z."""
    x, y = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * z for n, z in zip(shape[:2], zooms[:2])], indexing="ij")
    disc = x ** 2 + y ** 2 <= 4.0 ** 2
    cord = np.repeat(disc[:, :, None], shape[2], axis=2)
    image = np.where(cord, 100.0, 40.0).astype(np.float32)
    return carve.Background(image, cord, zooms, "cylinder")


@pytest.mark.parametrize("zooms", [(0.9, 0.9, 5.0), (0.5, 0.5, 1.0), (0.84, 0.84, 17.0)])
def test_lesion_is_inside_the_cord_and_brighter(zooms):
    bg = _background(zooms, (60, 60, max(3, int(70 / zooms[2]))))
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(12):
        x, y, _ = carve.carve_patch(bg, rng, (48, 48, 48), (0.5, 0.5, 1.0), p_free=0.0, shift_mm=0.0)
        assert x.shape == y.shape == (48, 48, 48)
        if not y.any():
            continue
        found += 1
        # the cylinder on the model grid: radius 4 mm around the patch's in-plane centre
        g = (np.arange(48) - 23.5) * 0.5
        disc = g[:, None] ** 2 + g[None, :] ** 2 <= (4.0 + zooms[0] + 0.5) ** 2  # the native mask's voxels
        assert (y.astype(bool) & ~disc[:, :, None]).sum() == 0
        inside = x[y > 0].mean()
        cord_only = x[disc[:, :, None] & (y == 0)[...]].mean() if (disc[:, :, None] & (y == 0)).any() else None
        assert cord_only is not None and inside > cord_only
    assert found >= 6


def test_lesion_free_share():
    bg = _background()
    rng = np.random.default_rng(0)
    empty = sum(not carve.carve_patch(bg, rng, (32, 32, 32), (0.5, 0.5, 1.0), p_free=1.0)[1].any() for _ in range(5))
    assert empty == 5


def test_thicker_background_averages_slabs():
    bg = _background((0.9, 0.9, 2.0), (20, 20, 9))
    bg.image[:, :, 1] += 30.0
    thick = carve.thicker(bg, 3)
    assert thick.image.shape == (20, 20, 3) and thick.zooms == (0.9, 0.9, 6.0)  # the trailing partial slab dropped
    assert np.allclose(thick.image[:, :, 0], bg.image[:, :, :3].mean(axis=2))
    assert np.array_equal(thick.cord[:, :, 0], bg.cord[:, :, 0])
    assert carve.thicker(bg, 1) is bg and carve.thicker(bg, 5) is bg  # fewer than two slabs: as it was


def test_varied_backgrounds_stay_within_their_bounds():
    bg = _background((0.9, 0.9, 2.0), (60, 60, 30))
    rng = np.random.default_rng(0)
    thicknesses = {carve.vary_background(bg, rng).zooms[2] for _ in range(40)}
    assert 2.0 in thicknesses and len(thicknesses) > 2 and max(thicknesses) <= 10.0
    x = np.full((8, 8, 8), 100.0, np.float32)
    for _ in range(20):
        y = carve.vary_intensity(x, rng)
        assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all() and (y >= 0).all()
        assert 80.0 < float(np.median(y)) < 125.0  # a gamma about the 99th percentile, noise of at most 5%


def test_gain_bands():
    rng = np.random.default_rng(0)
    g = np.array([carve.lesion_gain(rng) for _ in range(2000)])
    assert g.min() >= 1.1 and g.max() <= 2.0
    assert 0.4 < (g < 1.4).mean() < 0.6


@pytest.mark.slow
def test_onnx_weights_roundtrip(tmp_path):
    from pathlib import Path

    from cordseg.training import onnx_weights

    path = Path(carve.__file__).resolve().parents[1] / "models" / "cordseg_lesion.onnx"
    if not path.exists():
        import cordseg.inference as inf

        path = inf.find_model("lesion", "t2", None, None).path
    from cordseg.inference import Model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 48, 48, 48, len(Model.open(path).channels))).astype(np.float32)
    model = onnx_weights.keras_from_onnx(path, x)
    assert onnx_weights.parity(model, path, x) < 1e-4
    # batch norms rebuilt from the calibration data: training-mode statistics start near the moving ones
    train_out = np.asarray(model(x, training=True))
    infer_out = np.asarray(model(x, training=False))
    assert np.abs(train_out - infer_out).max() < 0.05


@pytest.mark.parametrize("slice_mm", [1.0, 5.0, 17.0])
def test_lesions_as_seen_show_their_drawn_brightness_on_native_voxels(monkeypatch, slice_mm):
    """as_seen: the scan shows each lesion's drawn brightness on the native voxels it at least half fills;
    drawn as tissue brightness instead, a small lesion on a thick slice barely shows."""
    from scipy import ndimage as ndi

    sub = carve._subdivision((0.9, 0.9, slice_mm))
    shape = (20, 20, 6)
    fine_shape = tuple(n * s for n, s in zip(shape, sub))
    rng = np.random.default_rng(0)
    img = (100.0 + rng.normal(0, 2, shape)).astype(np.float32)
    zz = (np.arange(fine_shape[2]) + 0.5) * slice_mm / sub[2]
    xx = (np.arange(fine_shape[0]) + 0.5) * 0.9 / sub[0]
    blob = ((xx[:, None, None] - 9.0) ** 2 + (xx[None, :, None] - 9.0) ** 2) / 1.5 ** 2 \
        + (zz[None, None, :] - 2.5 * slice_mm) ** 2 / 2.0 ** 2 <= 1.0  # 3 mm across, 4 mm long
    two = blob | np.roll(blob, 8, axis=0)  # two lesions, each judged on its own voxels
    monkeypatch.setattr(carve, "lesion_gain", lambda r: 1.25)
    texture = np.ones(fine_shape)
    delta = carve._seen_delta(two.astype(np.float32), texture, img, 100.0, sub, rng)
    seen_img = img + delta
    tissue = carve._voxel_means(two * 0.25 * 100.0, shape, sub) + img  # the same lesions at tissue 1.25
    comps, n = ndi.label(two)
    assert n == 2
    for i in (1, 2):
        fill = carve._voxel_means((comps == i).astype(float), shape, sub)
        on = fill >= min(0.5, fill.max())
        assert abs(seen_img[on].mean() / 100.0 - 1.25) < 0.01 or delta.max() >= 99.0 * (carve.MAX_TISSUE_GAIN - 1)
        if slice_mm >= 5:  # partial volume: drawn as tissue, the lesion would show far less
            assert tissue[on].mean() / 100.0 < 1.2
    assert delta.min() >= 0


def _flat_run_at_ends(x):
    """Model-grid slices at either end of the patch that repeat the patch's first or last slice, read in the
    ring that brightens slice by slice (_ramped)."""
    prof = x[23, 44, :]  # 10 mm from the cord's centre
    return int((np.abs(prof - prof[0]) < 1e-4).sum() + (np.abs(prof - prof[-1]) < 1e-4).sum())


def _ramped():
    """The cylinder with a ring 8-12 mm from its centre brightening by 2 per slice (the slices' medians, the
    background's, stay as they are: no levelling)."""
    bg = _background()
    zooms, shape = bg.zooms, bg.image.shape
    x, y = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * z for n, z in zip(shape[:2], zooms[:2])], indexing="ij")
    ring = (x ** 2 + y ** 2 > 8.0 ** 2) & (x ** 2 + y ** 2 < 12.0 ** 2)
    bg.image[ring] += 2.0 * np.arange(shape[2])
    return bg


def test_snapped_patches_end_where_the_scan_ends_and_do_not_repeat_its_end_slice():
    """A 70 mm scan of 5 mm slices: a patch reaching past an end repeats the end slice there (the default);
    with snap_ends it is moved inside the scan, as the runtime places its patches, and only the end slice's
    own half-thickness is flat (linear resampling beyond its centre)."""
    bg = _ramped()
    runs = {}
    for snap in (False, True):
        rng = np.random.default_rng(5)
        out = [carve.carve_patch(bg, rng, (48, 48, 48), (0.5, 0.5, 1.0), p_free=0.0, shift_mm=0.0, snap_ends=snap)
               for _ in range(16)]
        runs[snap] = [_flat_run_at_ends(x) for x, _, _ in out]
        for x, y, cord in out:
            assert x.shape == y.shape == cord.shape == (48, 48, 48)
    assert max(runs[False]) > 10  # some default patches repeat an end slice over 10 mm and more
    assert max(runs[True]) <= 2 * 3 + 2  # at most the end slices' half-thickness (2.5 mm) at both ends
    # and several snapped patches do reach an end (its slice's own flat half-thickness shows)
    assert sum(r > 2 for r in runs[True]) >= 4


def test_unknown_background_subject_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown background subject"):
        carve.training_backgrounds(tmp_path, tmp_path / "masks", ("unf01", "nobody"))


def test_background_subjects_name_only_files_with_a_contrast_the_lesion_model_serves():
    assert set(carve.TRAINING_SUBJECTS) <= set(carve.BACKGROUNDS)
    for subject, scans in carve.BACKGROUNDS.items():
        assert scans, subject
        for image, ref, contrast in scans:
            assert image.endswith(".nii.gz") and (ref is None or ref.endswith(".nii.gz"))
            assert contrast in ("t2", "t2s")


def test_reference_masked_backgrounds_load_from_the_shared_data(shared_data, tmp_path):
    bgs = carve.training_backgrounds(shared_data, tmp_path, ("unf01", "sct_testing"))
    assert [b.name for b in bgs] == [s[0] for s in carve.BACKGROUNDS["unf01"] + carve.BACKGROUNDS["sct_testing"]]
    for b in bgs:
        assert b.cord.shape == b.image.shape and b.cord.any()


def test_own_backgrounds_load_with_their_reference_mask_and_a_wrong_mask_is_refused(tmp_path):
    import nibabel as nib

    from cordseg.orientation import to_rpi
    from cordseg.phantom import make_phantom

    ph = make_phantom((40, 40, 24), (0.8, 0.8, 2.0), axcodes=("P", "S", "R"), seed=3)
    nib.save(ph.image, str(tmp_path / "img.nii.gz"))
    nib.save(ph.cord, str(tmp_path / "cord.nii.gz"))
    (bg,) = carve.load_backgrounds([(tmp_path / "img.nii.gz", tmp_path / "cord.nii.gz", "t2")], tmp_path / "masks")
    assert np.array_equal(bg.cord, to_rpi(ph.cord).data > 0.5)  # a reference is used as it is (not eroded)
    assert bg.zooms == pytest.approx((0.8, 0.8, 2.0))
    x, y, _ = carve.carve_patch(bg, np.random.default_rng(0), (32, 32, 32), (0.5, 0.5, 1.0), p_free=0.0)
    assert x.shape == (32, 32, 32) and y.any()
    nib.save(nib.Nifti1Image(np.ones((40, 40, 23), np.uint8), np.eye(4)), str(tmp_path / "short.nii.gz"))
    with pytest.raises(ValueError, match="cord mask has shape"):
        carve.load_backgrounds([(tmp_path / "img.nii.gz", tmp_path / "short.nii.gz", "t2")], tmp_path / "masks")
