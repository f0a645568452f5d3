"""Training code: the synthetic generator, the losses, a few steps of training, and resumption.

A small hand-made anatomy (a straight cord of white and grey matter in a CSF sheath inside bone) keeps
these fast; one test checks the PAM50 label maps from ../shared/data load into the same structure.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from scipy import ndimage

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cordseg.datasets import shared_data  # noqa: E402
from cordseg.training import synth  # noqa: E402

DATA = shared_data()


def _anatomy(nz=80):
    """60x60xnz labels at 0.5 mm: cord of radius 3 mm (grey matter core), CSF to 5 mm, bone to 9 mm."""
    n = 60
    x, y = np.meshgrid(np.arange(n) - 29.5, np.arange(n) - 29.5, indexing="ij")
    r = np.hypot(x, y) * synth.ANATOMY_ZOOM
    sl = np.zeros((n, n), np.uint8)
    sl[(r > 5) & (r <= 9)] = synth.BONE
    sl[r <= 5] = synth.CSF
    sl[r <= 3] = synth.WM
    sl[r <= 1.2] = synth.GM
    labels = np.repeat(sl[:, :, None], nz, axis=2)
    center = np.full((nz, 2), 29.5, np.float32)
    return synth.Anatomy(labels, center, (0, nz - 1))


@pytest.fixture(scope="module")
def anatomy():
    return _anatomy()


def _indicator_intensity(labels, rng, spacing, *, lesion=None, contrast=None, air=None, **_):
    """Stand-in for synth_intensity: 1 on the cord, 0 elsewhere."""
    return np.isin(labels, (synth.WM, synth.GM)).astype(np.float32)


def _lesion_intensity(labels, rng, spacing, *, lesion=None, contrast=None, air=None, **_):
    """Stand-in for synth_intensity: the soft lesion map itself."""
    return np.zeros(labels.shape, np.float32) if lesion is None else lesion.astype(np.float32)


def _no_degrade(image, rng, spacing, **kw):
    return image


# ----------------------------------------------------------------------------------------------------
# generator


def test_heatmap_target_follows_the_cord_through_every_transform(anatomy, monkeypatch):
    """With the image = cord indicator, after rotation, scaling, elastic moves, flips, slab averaging
    and pooling the target must be exactly where the (pooled) cord intensity is."""
    monkeypatch.setattr(synth, "synth_intensity", _indicator_intensity)
    monkeypatch.setattr(synth, "degrade", _no_degrade)
    seen_cord = 0
    for seed in range(12):
        img, tgt = synth.heatmap_sample(anatomy, np.random.default_rng(seed), size=32, zoom=1.0)
        assert img.shape == tgt.shape == (32, 32)
        np.testing.assert_array_equal(tgt, (img >= 0.5).astype(np.float32))
        seen_cord += int(tgt.sum() > 0)
    assert seen_cord >= 6  # some samples are deliberately above or below the cord


def test_patch_targets_follow_cord_and_lesions(anatomy, monkeypatch):
    """Same geometry twice (same seed; the stand-ins draw no random numbers): once imaging the cord,
    once imaging the lesions. Each target must sit exactly where its structure's pooled intensity is."""
    monkeypatch.setattr(synth, "degrade", _no_degrade)
    n_lesion = 0
    for seed in range(5):
        kw = dict(shape=(24, 24, 8), spacing=(0.5, 0.5, 1.0), lesions=True)
        monkeypatch.setattr(synth, "synth_intensity", _indicator_intensity)
        img_c, cord, lesion = synth.patch_sample(anatomy, np.random.default_rng(seed), **kw)
        monkeypatch.setattr(synth, "synth_intensity", _lesion_intensity)
        img_l, cord2, lesion2 = synth.patch_sample(anatomy, np.random.default_rng(seed), **kw)
        np.testing.assert_array_equal(cord, cord2)
        np.testing.assert_array_equal(lesion, lesion2)
        assert img_c.shape == cord.shape == lesion.shape == (24, 24, 8)
        assert cord.sum() > 0  # patches are centred near the cord
        np.testing.assert_array_equal(cord, (img_c >= 0.5).astype(np.float32))
        np.testing.assert_array_equal(lesion, (img_l >= 0.5).astype(np.float32))
        assert np.all(lesion <= cord)  # lesion target inside the cord target
        n_lesion += int(lesion.sum() > 0)
    assert n_lesion >= 1


def test_samples_are_finite_deterministic_and_lesions_inside_cord(anatomy):
    a = synth.heatmap_sample(anatomy, np.random.default_rng(7), size=32)
    b = synth.heatmap_sample(anatomy, np.random.default_rng(7), size=32)
    c = synth.heatmap_sample(anatomy, np.random.default_rng(8), size=32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert np.all(np.isfinite(a[0])) and a[0].dtype == np.float32 and set(np.unique(a[1])) <= {0.0, 1.0}
    for seed in range(3):
        img, cord, lesion = synth.patch_sample(anatomy, np.random.default_rng(seed), shape=(24, 24, 8),
                                               lesions=True)
        assert np.all(np.isfinite(img)) and img.std() > 0
        assert np.all(lesion <= cord)
    d1 = synth.patch_sample(anatomy, np.random.default_rng(3), shape=(16, 16, 8), lesions=True)
    d2 = synth.patch_sample(anatomy, np.random.default_rng(3), shape=(16, 16, 8), lesions=True)
    for x, y in zip(d1, d2):
        np.testing.assert_array_equal(x, y)


def test_inserted_lesions_stay_in_the_cord(anatomy):
    rng = np.random.default_rng(0)
    labels = anatomy.labels[:, :, :20]
    soft = synth.insert_lesions(labels, rng, (0.5, 0.5, 0.5), count=(3, 3), volume_mm3=(5.0, 50.0))
    cord = np.isin(labels, (synth.WM, synth.GM))
    assert soft.max() > 0.5 and np.all(soft[~cord] == 0) and soft.min() >= 0 and soft.max() <= 1


def _lesion_to_cord_ratio(anatomy, seed, lesion_contrast):
    labels = anatomy.labels[:, :, :8]
    lesion = np.zeros(labels.shape, np.float32)
    lesion[28:32, 28:32, :] = 1.0  # the grey matter core
    rng = np.random.default_rng(seed)
    img = synth.synth_intensity(labels, rng, (0.5, 0.5, 0.5), lesion=lesion, contrast="t2",
                                lesion_contrast=lesion_contrast)
    wm = labels == synth.WM
    return float(np.median(img[lesion > 0]) / np.median(img[wm]))


def test_faint_lesion_style_draws_fainter_smaller_lesions(anatomy):
    shipped = [_lesion_to_cord_ratio(anatomy, s, 1.0) for s in range(40)]
    faint = [_lesion_to_cord_ratio(anatomy, s, 0.4) for s in range(40)]
    # t2 prior: lesions 1.4-2.2x the cord's mean; faint ones keep 40-100% of that difference
    assert min(shipped) > 1.2 and min(faint) > 1.0
    assert np.median(faint) < np.median(shipped) - 0.15
    style = synth.LESION_STYLES["faint"]
    assert style.volume_mm3[1] < synth.LESION_STYLES["shipped"].volume_mm3[1] and style.p_free > 0.15
    free = sum(not synth.patch_sample(anatomy, np.random.default_rng(s), shape=(16, 16, 8), lesions=True,
                                      style=dataclasses.replace(style, p_free=0.5))[2].any() for s in range(24))
    assert 4 <= free <= 20  # about half lesion-free (a drawn lesion may also be too small to survive)


def test_task_samplers_give_network_ready_batches(anatomy):
    from cordseg.training import tasks

    ctr = dataclasses.replace(tasks.TASKS["centerline"], patch_shape=(32, 32), batch_size=2)
    x, y = tasks.Sampler(ctr, anatomy)(np.random.default_rng(0))
    assert x.shape == y.shape == (2, 32, 32, 1) and x.dtype == np.float32 and np.all(np.isfinite(x))
    les = dataclasses.replace(tasks.TASKS["lesion"], patch_shape=(16, 16, 8), batch_size=2)
    x, y = tasks.Sampler(les, anatomy)(np.random.default_rng(1))
    assert x.shape == y.shape == (2, 16, 16, 8, 1) and np.all(np.isfinite(x))
    assert abs(float(x.mean())) < 0.5  # z-scored


def test_pam50_anatomy_loads(tmp_path):
    folder = DATA / "labelmaps" / "PAM50"
    if not (folder / "PAM50_cord.nii.gz").exists():
        pytest.skip(f"PAM50 label maps not found at {folder}")
    anat = synth.Anatomy.load(folder)
    lo, hi = anat.cord_z
    assert anat.labels.shape == (141, 141, 991) and 0 <= lo < hi < 991 and hi - lo > 500
    z = (lo + hi) // 2
    cx, cy = anat.center[z]
    assert anat.labels[int(round(cx)), int(round(cy)), z] in (synth.WM, synth.GM)  # centre lies in the cord
    assert np.all(np.isnan(anat.center[:lo]))
    anat.save(tmp_path / "a.npz")
    again = synth.Anatomy.load(tmp_path / "a.npz")
    assert again.cord_z == anat.cord_z and np.array_equal(again.labels, anat.labels)


def _write_mask(path, mask, zooms):
    import nibabel as nib

    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.diag([*zooms, 1.0])), str(path))  # RAS


def _thick_slice_masks(n=80, nz=8, dz=5.0, radius_mm=3.5, ring_mm=2.0):
    """A straight cord (radius 3.5 mm) at voxel (30, 45) in a CSF ring, 0.5 mm in-plane, 5 mm slices, RAS."""
    x, y = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    r = np.hypot(x - 30, y - 45) * 0.5
    cord = np.repeat((r <= radius_mm)[:, :, None], nz, axis=2)
    csf = np.repeat(((r > radius_mm) & (r <= radius_mm + ring_mm))[:, :, None], nz, axis=2)
    return cord, csf, (0.5, 0.5, dz)


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_thick_slices_blur_along_the_acquisition_axis_only(slice_axis):
    """Axial acquisitions are thick along z, sagittal ones along x (left-right)."""
    other = 1 if slice_axis == 0 else 0
    line_axis = 3 - slice_axis - other
    img = np.zeros((40, 40, 40), np.float32)
    idx = [20, 20, 20]
    idx[line_axis] = slice(None)
    img[tuple(idx)] = 50.0  # a bright line, across both axes compared (noise is at most 0.08)
    out = synth.degrade(img, np.random.default_rng(0), (0.5, 0.5, 0.5), thickness_mm=5.0, inplane_mm=0.5,
                        slice_axis=slice_axis)

    def spread(axis):  # width of the response through the line along `axis`, in voxels
        line = np.moveaxis(out, axis, 0)[:, 20, 20]
        return int((line > 0.2 * out.max()).sum())

    assert spread(slice_axis) >= 6 and spread(other) <= 3
    assert np.all(np.isfinite(out))


def test_samples_with_sagittal_acquisitions_keep_their_targets(anatomy, monkeypatch):
    monkeypatch.setattr(synth, "synth_intensity", _indicator_intensity)
    monkeypatch.setattr(synth, "degrade", _no_degrade)
    for seed in range(4):
        img, tgt = synth.heatmap_sample(anatomy, np.random.default_rng(seed), size=32, p_sagittal=1.0, p_outside=0)
        assert tgt.sum() > 0 and np.corrcoef(img.ravel(), tgt.ravel())[0, 1] > 0.9
        img, cord, _ = synth.patch_sample(anatomy, np.random.default_rng(seed), shape=(24, 24, 8), p_sagittal=1.0)
        assert cord.sum() > 0 and np.corrcoef(img.ravel(), cord.ravel())[0, 1] > 0.9


def test_thick_slice_mask_becomes_an_isotropic_anatomy(tmp_path):
    cord, csf, zooms = _thick_slice_masks()
    _write_mask(tmp_path / "c.nii.gz", cord, zooms)
    _write_mask(tmp_path / "f.nii.gz", csf, zooms)
    anat = synth.Anatomy.from_masks(tmp_path / "c.nii.gz", tmp_path / "f.nii.gz", margin_mm=5.0)
    assert anat.extend_z and anat.labels.shape[2] == 80  # 8 slices of 5 mm at 0.5 mm
    area = (anat.labels == synth.WM).sum(axis=(0, 1)) * 0.25  # mm² per slice
    assert np.allclose(area, np.pi * 3.5**2, rtol=0.08)
    canal = np.isin(anat.labels, (synth.WM, synth.CSF)).sum(axis=(0, 1)) * 0.25
    assert np.allclose(canal, np.pi * 5.5**2, rtol=0.08)
    assert not np.isnan(anat.center).any() and anat.cord_z == (0, 79)
    # the crop keeps the cord's half-width (7 voxels) + a 5 mm margin (10 voxels) + a 1-voxel border
    assert np.allclose(anat.center, 18.0, atol=0.6)
    # the background border lets edge repetition continue the cord past the field of view, not the crop
    labels = synth.sample_label_grid(anat, np.random.default_rng(0), (60, 60, 60), (0.5, 0.5, 1.0), 40,
                                     max_tilt=0, max_inplane=0, scale_range=(1, 1), elastic_mm=0, bend_mm=0)
    assert (labels == synth.WM).any(axis=(0, 1)).all() and (labels[[0, -1]] == synth.BG).all()


def test_cord_mask_without_csf_gets_a_ring(tmp_path):
    cord, _, zooms = _thick_slice_masks()
    _write_mask(tmp_path / "c.nii.gz", cord, zooms)
    anat = synth.Anatomy.from_masks(tmp_path / "c.nii.gz", csf_ring_mm=1.5, margin_mm=5.0)
    canal = np.isin(anat.labels, (synth.WM, synth.CSF)).sum(axis=(0, 1)) * 0.25
    assert np.allclose(canal, np.pi * 5.0**2, rtol=0.1)


def test_load_anatomies_from_a_labelmap_folder(tmp_path):
    cord, csf, zooms = _thick_slice_masks()
    pam = tmp_path / "PAM50"
    pam.mkdir()
    big = np.zeros((40, 40, 30), bool)
    big[15:25, 15:25, 5:25] = True
    for name, m in [("cord", big), ("gm", np.zeros_like(big)), ("csf", np.zeros_like(big)),
                    ("spine", np.zeros_like(big))]:
        _write_mask(pam / f"PAM50_{name}.nii.gz", m, (0.5, 0.5, 0.5))
    sg = tmp_path / "spinegeneric"
    sg.mkdir()
    for subject in ("sub-a01", "sub-unf01"):  # sub-unf01 is a validation subject: never a training anatomy
        _write_mask(sg / f"{subject}_T2w_seg-manual.nii.gz", cord, zooms)
        _write_mask(sg / f"{subject}_T2w_csfseg-manual.nii.gz", csf, zooms)
        _write_mask(sg / f"{subject}_T1w_seg-manual.nii.gz", cord, zooms)  # a copy of the T2w mask: skipped
        _write_mask(sg / f"{subject}_T2star_seg-manual.nii.gz", cord, zooms)  # no CSF mask: a ring
    anats = synth.load_anatomies(tmp_path)
    assert len(anats) == 3 and not anats[0].extend_z and all(a.extend_z for a in anats[1:])
    assert anats[0].cord_z == (5, 24)
    out = tmp_path / "npz"
    out.mkdir()
    for i, a in enumerate(anats):
        a.save(out / f"{i:02d}.npz")
    again = synth.load_anatomies(out)
    assert [a.extend_z for a in again] == [False, True, True]
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(anats, again))


def test_sampler_mixes_anatomies_and_keeps_no_cord_slices_to_the_template(anatomy):
    from cordseg.training import tasks

    masks = dataclasses.replace(_anatomy(nz=40), extend_z=True)
    s = tasks.Sampler(tasks.TASKS["centerline"], [anatomy, masks])
    picks = [s._anatomy(np.random.default_rng(i)) for i in range(200)]
    from_masks = [p for p in picks if p[0] is masks]
    assert 60 < len(from_masks) < 140 and all(p[1] == 0.0 for p in from_masks)
    assert all(p[1] == pytest.approx(0.24) for p in picks if p[0] is anatomy)
    # an anatomy cut by its field of view never gives a slice without cord
    for seed in range(10):
        _img, tgt = synth.heatmap_sample(masks, np.random.default_rng(seed), size=32, p_outside=1.0)
        assert tgt.sum() > 0


# ----------------------------------------------------------------------------------------------------
# losses


def test_losses():
    from cordseg.training.losses import dice_bce_loss, soft_dice_loss

    rng = np.random.default_rng(0)
    a = (rng.random((2, 16, 16, 1)) > 0.5).astype(np.float32)
    assert float(soft_dice_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    disjoint = 1.0 - a
    assert float(soft_dice_loss(a, disjoint)) > 0.99
    # BCE part: a confident right answer costs ~0, a confident wrong one a lot, an unsure one in between
    right = float(dice_bce_loss(a, a))
    unsure = float(dice_bce_loss(a, np.full_like(a, 0.5)))
    wrong = float(dice_bce_loss(a, disjoint))
    assert right < 1e-4 < unsure < wrong
    assert unsure - float(soft_dice_loss(a, np.full_like(a, 0.5))) == pytest.approx(np.log(2.0), rel=1e-3)
    # an empty target still gets a gradient signal: predicting zeros is cheaper than predicting 0.5
    empty = np.zeros_like(a)
    assert float(dice_bce_loss(empty, np.full_like(a, 0.01))) < float(dice_bce_loss(empty, np.full_like(a, 0.5)))


# ----------------------------------------------------------------------------------------------------
# training loop


def _disc_sampler(rng):
    """Tiny learnable task: a bright noisy disc on a dark background; target = the disc."""
    n = 16
    yy, xx = np.mgrid[:n, :n]
    xs, ys = [], []
    for _ in range(4):
        c = rng.uniform(5, 11, 2)
        disc = (np.hypot(yy - c[0], xx - c[1]) <= rng.uniform(2.5, 4.0)).astype(np.float32)
        xs.append(disc + rng.normal(0, 0.2, (n, n)))
        ys.append(disc)
    return np.stack(xs)[..., None].astype(np.float32), np.stack(ys)[..., None]


def _tiny_cnn1():
    from cordseg.training.networks import build_cnn1

    return build_cnn1(filters=(4, 8, 8), bottleneck_dilations=(1, 2), dropout=0.0, name="tiny")


def _losses_from_log(path):
    rows = [line.split(",") for line in path.read_text().splitlines() if line]
    return {int(r[0]): float(r[1]) for r in rows}


@pytest.mark.training
def test_training_lowers_the_loss_and_resumes(tmp_path):
    keras = pytest.importorskip("keras")
    from cordseg.training.loop import train
    from cordseg.training.losses import dice_bce_loss

    keras.utils.set_random_seed(0)
    messages = []
    out = tmp_path / "run"
    train(_tiny_cnn1, dice_bce_loss, _disc_sampler, out_dir=out, steps=100, learning_rate=1e-2, seed=0,
          checkpoint_every=50, snapshot_every=100, log=messages.append, lr_schedule="constant")
    losses = _losses_from_log(out / "log.csv")
    assert sorted(losses) == [50, 100]
    assert losses[100] < 0.8 * losses[50]  # mean loss of steps 51-100 well below that of steps 1-50
    assert json.loads((out / "state.json").read_text()) == {"step": 100}
    assert (out / "checkpoint.keras").is_file() and (out / "ema_000100.weights.h5").is_file()

    messages.clear()
    model = train(_tiny_cnn1, dice_bce_loss, _disc_sampler, out_dir=out, steps=150, learning_rate=1e-2, seed=0,
                  checkpoint_every=50, snapshot_every=100, log=messages.append, lr_schedule="constant")
    assert messages[0] == "resumed from step 100"
    assert json.loads((out / "state.json").read_text()) == {"step": 150}
    losses = _losses_from_log(out / "log.csv")
    assert sorted(losses) == [50, 100, 150]  # resumed: steps 101-150 only, not a fresh run
    assert losses[150] < losses[50]
    # the EMA snapshot loads into a fresh network of the same shape
    fresh = _tiny_cnn1()
    fresh.load_weights(str(out / "ema_000150.weights.h5"))
    x, y = _disc_sampler(np.random.default_rng(123))
    pred = np.asarray(model(x, training=False))
    assert pred.shape == y.shape and np.all(np.isfinite(pred))


@pytest.mark.training
def test_stop_at_ends_early_on_the_full_schedule(tmp_path):
    """A run stopped at a step keeps the learning rate it would have had there in the longer run."""
    keras = pytest.importorskip("keras")
    from cordseg.training.loop import train
    from cordseg.training.losses import dice_bce_loss

    messages = []
    model = train(_tiny_cnn1, dice_bce_loss, _disc_sampler, out_dir=tmp_path, steps=40, stop_at=15,
                  learning_rate=1e-2, seed=0, snapshot_every=10, log=messages.append)
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 15}
    assert sorted(p.name for p in tmp_path.glob("ema_*")) == ["ema_000010.weights.h5", "ema_000015.weights.h5"]
    assert messages[-1] == "stopping at step 15: stop_at 15"
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=40, alpha=0.05)
    lr = model.optimizer.learning_rate  # evaluated at the optimiser's own iteration count
    assert int(model.optimizer.iterations) == 15
    np.testing.assert_allclose(float(lr), float(schedule(15)), rtol=1e-5)
    assert float(lr) > 2 * float(keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=15, alpha=0.05)(15))


@pytest.mark.training
def test_average_of_snapshots_is_their_mean(tmp_path):
    pytest.importorskip("keras")
    from cordseg.training.loop import average_snapshots

    paths, weights = [], []
    for i in range(3):
        model = _tiny_cnn1()
        w = [np.full(v.shape, float(i + 1) * (k + 1), np.float32) for k, v in enumerate(model.get_weights())]
        model.set_weights(w)
        paths.append(tmp_path / f"ema_{i:06d}.weights.h5")
        model.save_weights(str(paths[-1]))
        weights.append(w)
    out = average_snapshots(_tiny_cnn1, paths, tmp_path / "avg.weights.h5")
    fresh = _tiny_cnn1()
    fresh.load_weights(str(out))
    for k, v in enumerate(fresh.get_weights()):  # batch-norm statistics are averaged as well
        np.testing.assert_allclose(v, 2.0 * (k + 1), rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    # weighted: shares 1/2, 1/4, 1/4 of values 1, 2, 3 (times k + 1) give 1.75
    out = average_snapshots(_tiny_cnn1, paths, tmp_path / "w.weights.h5", weights=[0.5, 0.25, 0.25])
    fresh.load_weights(str(out))
    for k, v in enumerate(fresh.get_weights()):
        np.testing.assert_allclose(v, 1.75 * (k + 1), rtol=1e-6)
    with pytest.raises(ValueError, match="summing to 1"):
        average_snapshots(_tiny_cnn1, paths, tmp_path / "bad.weights.h5", weights=[0.5, 0.5, 0.5])


@pytest.mark.training
@pytest.mark.parametrize("channels, base", [(2, 4), (1, 6), (2, 6)])
def test_a_widened_cnn2_starts_as_the_narrow_one(tmp_path, channels, base):
    """More input channels and/or more filters: the widened network's output equals the narrow one's on
    any input (after concatenations the old channels sit apart, so a plain prefix copy would fail)."""
    pytest.importorskip("keras")
    from cordseg.training import tasks
    from cordseg.training.train import load_init

    cfg = tasks.with_network(tasks.TASKS["lesion"], {"base_filters": 4}, channels=("image",))
    cfg.patch_shape = (16, 16, 16)
    narrow = tasks.build_model(cfg)
    rng = np.random.default_rng(0)  # batch-norm statistics away from the identity, so they must be copied
    narrow.set_weights([rng.normal(1.0 if "variance" in v.path else 0.0, 0.3, v.shape).astype(np.float32)
                        if "variance" not in v.path else rng.uniform(0.5, 2, v.shape).astype(np.float32)
                        for v in narrow.weights])
    narrow.save_weights(str(tmp_path / "narrow.weights.h5"))
    wide_cfg = tasks.with_network(cfg, {"base_filters": base}, channels=("image", "cord_anomaly")[:channels])
    wide = tasks.build_model(wide_cfg)
    load_init(wide, wide_cfg, tmp_path / "narrow.weights.h5")
    x = rng.normal(0, 1, (2, 16, 16, 16, channels)).astype(np.float32)
    np.testing.assert_allclose(wide.predict(x, verbose=0), narrow.predict(x[..., :1], verbose=0), atol=1e-5)
    assert wide.count_params() > narrow.count_params()
    with pytest.raises(ValueError):  # narrowing is not widening
        load_init(narrow, cfg, _saved(wide, tmp_path / "wide.weights.h5"))


def _saved(model, path):
    model.save_weights(str(path))
    return path


# ----------------------------------------------------------------------------------------------------
# the cord's lower end: dural sac and nerve roots below the conus


def _anatomy_with_conus(nz=80, tip=30, csf_from=36):
    """Like _anatomy, but the cord tapers to a tip at slice `tip` and, as in PAM50, the CSF starts above
    it: below there is bone only."""
    a = _anatomy(nz)
    labels = a.labels.copy()
    for z in range(nz):
        sl = labels[:, :, z]
        if z < csf_from:
            sl[sl == synth.CSF] = synth.BG
        if z < tip:
            sl[np.isin(sl, (synth.WM, synth.GM))] = synth.BG
        elif z < tip + 8:  # the conus: a thinner cord
            n = sl.shape[0]
            x, y = np.meshgrid(np.arange(n) - 29.5, np.arange(n) - 29.5, indexing="ij")
            thin = np.hypot(x, y) * synth.ANATOMY_ZOOM > 0.5 + 0.3 * (z - tip)
            sl[thin & np.isin(sl, (synth.WM, synth.GM))] = synth.BG
    return labels


def test_cauda_equina_adds_a_sac_with_roots_below_the_conus_and_no_cord():
    labels = _anatomy_with_conus()
    out = synth.add_cauda_equina(labels, below_mm=10.0, n_roots=6)
    pad = 20
    assert out.shape == labels.shape[:2] + (labels.shape[2] + pad,)
    upper, old = out[:, :, pad + 36:], labels[:, :, 36:]  # above the sac's start: as it was, but for roots
    assert np.all(np.isin(old[upper == synth.ROOTS], (synth.CSF, synth.BG)))  # leaving the conus's sides
    assert np.all(np.isin(old[upper == synth.CSF], (synth.CSF, synth.BG)))
    kept = ~np.isin(upper, (synth.ROOTS, synth.CSF))
    np.testing.assert_array_equal(upper[kept], old[kept])
    below = out[:, :, :pad + 30]  # under the conus's tip
    assert not np.isin(below, (synth.WM, synth.GM)).any()
    for z in range(0, pad + 30, 5):
        sl = below[:, :, z]
        assert (sl == synth.CSF).sum() > 100  # a dural sac on every slice
        assert (sl == synth.ROOTS).sum() > 0  # with nerve roots in it
        roots_in_sac = ndimage.binary_fill_holes(np.isin(sl, (synth.CSF, synth.ROOTS)))
        assert np.all(roots_in_sac[sl == synth.ROOTS])
    assert np.array_equal(out[:, :, :pad] == synth.BONE, labels[:, :, pad - 1::-1] == synth.BONE)


def test_cauda_equina_bundles_are_template_copies_with_their_clumps_elsewhere(tmp_path, monkeypatch):
    labels = _anatomy_with_conus()
    clumps = [np.argwhere(synth.add_cauda_equina(labels, below_mm=10.0, seed=k, bundle=True)[:, :, 5:20]
                          == synth.ROOTS)[:, :2].mean(axis=0) for k in range(synth.ROOT_VARIANTS)]
    gaps = [np.hypot(*(a - b)) for i, a in enumerate(clumps) for b in clumps[i + 1:]]
    assert min(gaps) > 0.5  # voxels of 0.5 mm: no two copies clump at the same place
    calls = []
    monkeypatch.setattr(synth.Anatomy, "from_pam50",
                        classmethod(lambda cls, folder, **kw: calls.append(kw) or len(calls)))
    (tmp_path / "PAM50_cord.nii.gz").touch()
    assert synth.load_anatomies(tmp_path, cauda_equina="bundles") == list(range(1, synth.ROOT_VARIANTS + 1))
    assert calls == [dict(cauda_equina="bundle", root_seed=k) for k in range(synth.ROOT_VARIANTS)]
    calls.clear()
    synth.load_anatomies(tmp_path, cauda_equina="bundle")
    assert calls == [dict(cauda_equina="bundle")]  # the shipped recipe's single copy, as it was


def test_cauda_equina_bundle_gathers_the_roots_into_one_clump():
    """bundle=True: more roots, gathered tighter than the strands (their spread on the slices under the tip),
    with the same guarantees: no cord below the tip, roots inside the sac."""
    labels = _anatomy_with_conus()

    def spread(out):
        below = out[:, :, 5:20]  # well under the tip (pad 20 + tip 30)
        pts = np.argwhere(below == synth.ROOTS)[:, :2]
        return pts.std(axis=0).mean(), (below == synth.ROOTS).sum()

    strands = synth.add_cauda_equina(labels, below_mm=10.0, seed=1)
    bundle = synth.add_cauda_equina(labels, below_mm=10.0, seed=1, bundle=True)
    (s_spread, s_voxels), (b_spread, b_voxels) = spread(strands), spread(bundle)
    assert b_voxels > 1.5 * s_voxels  # 40 roots against 16
    assert b_spread < s_spread
    assert not np.isin(bundle[:, :, :50], (synth.WM, synth.GM)).any()
    for z in range(0, 50, 5):
        sl = bundle[:, :, z]
        roots_in_sac = ndimage.binary_fill_holes(np.isin(sl, (synth.CSF, synth.ROOTS)))
        assert np.all(roots_in_sac[sl == synth.ROOTS])


def test_conus_slices_below_the_tip_have_no_cord_target():
    labels = synth.add_cauda_equina(_anatomy_with_conus(nz=120), below_mm=20.0, n_roots=8)
    anatomy = synth.Anatomy._with_centres(labels)
    tip = anatomy.cord_z[0]
    rng = np.random.default_rng(0)
    seen_roots = 0
    for _ in range(30):
        # a straight, unrotated anatomy: template slice z is the sample's slice
        z = float(rng.uniform(tip - 30, tip - 3))
        grid = synth.sample_label_grid(anatomy, rng, (40, 40, 1), (0.5, 0.5, 0.5), z, max_tilt=0.0,
                                       max_inplane=0.0, scale_range=(1.0, 1.0), elastic_mm=0.0, bend_mm=0.0)
        assert not np.isin(grid, (synth.WM, synth.GM)).any()
        seen_roots += bool((grid == synth.ROOTS).any())
    assert seen_roots >= 20
    for _ in range(10):
        img, target = synth.heatmap_sample(anatomy, rng, size=32, p_conus=1.0)
        assert np.all(np.isfinite(img)) and set(np.unique(target)) <= {0.0, 1.0}


def test_conus_patches_for_cnn2_are_drawn_around_the_tip():
    """patch_sample(p_conus=1): centred within 50-60 mm of the tip; those wholly below it have no cord."""
    labels = synth.add_cauda_equina(_anatomy_with_conus(nz=240), below_mm=60.0, n_roots=8)
    anatomy = synth.Anatomy._with_centres(labels)
    rng = np.random.default_rng(3)
    empty = 0
    for _ in range(12):
        img, cord, _ = synth.patch_sample(anatomy, rng, shape=(24, 24, 16), p_conus=1.0, p_sagittal=0.0)
        assert np.all(np.isfinite(img)) and img.shape == cord.shape == (24, 24, 16)
        empty += not cord.any()
    assert empty >= 2  # patches under the tip: roots and sac, no cord target


def test_dwi_patches_show_a_bright_cord_on_dark_csf(anatomy, monkeypatch):
    rng = np.random.default_rng(0)
    for _ in range(6):
        labels = anatomy.labels[:, :, :20]
        img = synth.synth_intensity(labels, rng, (0.5, 0.5, 0.5), dwi=True)
        cord = img[np.isin(labels, (synth.WM, synth.GM))].mean()
        assert cord > 2 * img[labels == synth.CSF].mean() and cord > img[labels == synth.BONE].mean()
    img, cord, lesion = synth.patch_sample(anatomy, rng, shape=(24, 24, 16), p_dwi=1.0)
    assert np.all(np.isfinite(img)) and cord.any() and not lesion.any()
    # lesion patches never draw the DWI family (it is for cord models)
    drawn = []
    real = synth.synth_intensity
    monkeypatch.setattr(synth, "synth_intensity", lambda *a, **kw: drawn.append(kw["dwi"]) or real(*a, **kw))
    synth.patch_sample(anatomy, np.random.default_rng(1), shape=(24, 24, 16), lesions=True, p_dwi=1.0)
    synth.patch_sample(anatomy, np.random.default_rng(1), shape=(24, 24, 16), p_dwi=1.0)
    assert drawn == [False, True]


def test_sampler_passes_the_cnn2_shares(anatomy, monkeypatch):
    from cordseg.training import tasks

    seen = []
    monkeypatch.setattr(synth, "patch_sample", lambda *a, **kw: seen.append(kw) or (
        np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.float32)))
    cfg = dataclasses.replace(tasks.TASKS["sc"], patch_shape=(8, 8, 8), batch_size=1, p_sagittal=0.5, p_dwi=0.2,
                              p_conus=0.1)
    tasks.Sampler(cfg, anatomy)(np.random.default_rng(0))
    assert seen[0]["p_sagittal"] == 0.5 and seen[0]["p_dwi"] == 0.2 and seen[0]["p_conus"] == 0.1


@pytest.mark.parametrize("args, says", [
    (["lesion", "--real-backgrounds", "--background-subjects", "unf01,nobody"], "unknown nobody"),
    (["lesion", "--background-subjects", "sub-03"], "is for --real-backgrounds"),
    (["centerline", "--channels", "image,cord_anomaly"], "--channels is for CNN2"),
    (["sc", "--blob-loss", "1"], "are for the lesion task"),
    (["sc", "--real-backgrounds"], "are for the lesion task"),
    (["lesion", "--backgrounds-from", "no/such/folder"], "is not a folder"),
    (["lesion", "--backgrounds-from", "."], "no lesion-free T2w, T2star or MTS image"),
])
def test_training_options_that_do_not_go_together_get_one_line(tmp_path, capsys, args, says):
    pytest.importorskip("keras")
    from cordseg.training import train

    with pytest.raises(SystemExit) as exit_:
        train.main(args + ["--out", str(tmp_path / "run"), "--steps", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_lesion_training_on_own_lesion_free_scans(tmp_path, capsys):
    """--backgrounds-from: a BIDS folder of lesion-free scans is carved into, and only it (no shared subject)."""
    pytest.importorskip("keras")
    import nibabel as nib

    from cordseg.phantom import make_phantom
    from cordseg.training import train

    labelmaps = shared_data("labelmaps")
    if not labelmaps.is_dir():
        pytest.skip("the synthetic half needs the PAM50 label maps of ../shared/data")
    bids = tmp_path / "controls"
    for i, sub in enumerate(("sub-c1", "sub-c2")):
        ph = make_phantom((48, 48, 30), (0.9, 0.9, 3.0), seed=i)
        (bids / sub / "anat").mkdir(parents=True)
        nib.save(ph.image, str(bids / sub / "anat" / f"{sub}_T2star.nii.gz"))
        nib.save(ph.cord, str(bids / sub / "anat" / f"{sub}_T2star_seg-manual.nii.gz"))
    out = tmp_path / "run"
    assert train.main(["lesion", "--backgrounds-from", str(bids), "--labelmaps", str(labelmaps), "--out", str(out),
                       "--steps", "2", "--batch-size", "2", "--patch-shape", "32x32x32", "--real-share", "1",
                       "--snapshot-every", "2"]) == 0
    said = capsys.readouterr().out
    assert "2 real lesion-free backgrounds (sub-c1, sub-c2)" in said
    assert (out / "ema_000002.weights.h5").is_file()
