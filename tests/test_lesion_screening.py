"""Lesion screening (lesions.screen_lesions, segment_lesions(min_contrast=)): reported lesions touch the
cord and are brighter than the lesion-free cord on their slices."""
import numpy as np
import pytest
from scipy import ndimage as ndi

import cordseg
from cordseg import lesions
from cordseg.errors import InputError
from cordseg.phantom import make_phantom


def _scene():
    """A 12-voxel-wide square cord of intensity 100 over 10 slices; masks of three candidate lesions."""
    image = np.full((40, 40, 10), 20.0, np.float32)
    cord = np.zeros(image.shape, np.uint8)
    cord[14:26, 14:26, :] = 1
    image[cord > 0] = 100.0
    mask = np.zeros(image.shape, np.uint8)
    mask[16:19, 16:19, 2:4] = 1  # bright: 1.5x the cord
    image[16:19, 16:19, 2:4] = 150.0
    mask[22:25, 22:25, 6:8] = 1  # as bright as the cord around it (bright grey matter)
    image[22:25, 22:25, 6:8] = 103.0
    mask[2:5, 2:5, 4:6] = 1  # outside the cord (bright CSF)
    image[2:5, 2:5, 4:6] = 180.0
    return image, cord, mask


def test_contrast_of_each_lesion_against_the_cord_on_its_slices():
    image, cord, mask = _scene()
    labels, contrasts = lesions.lesion_contrasts(mask, image, cord)
    by_label = {int(labels[17, 17, 2]): 1.5, int(labels[23, 23, 6]): 1.03}
    for label, expected in by_label.items():
        assert contrasts[label - 1] == pytest.approx(expected)


def test_screening_keeps_the_bright_lesion_in_the_cord_only():
    image, cord, mask = _scene()
    kept, dropped = lesions.screen_lesions(mask, image, cord, 1.1)
    assert dropped == 2
    assert kept.dtype == mask.dtype and kept.sum() == 18 and kept[16:19, 16:19, 2:4].all()
    # a lower bar keeps the faint one too, never the one outside the cord
    kept, dropped = lesions.screen_lesions(mask, image, cord, 1.0)
    assert dropped == 1 and kept[22:25, 22:25, 6:8].all() and not kept[2:5, 2:5, 4:6].any()


def test_screening_is_the_same_on_an_offset_image():
    """Intensities below zero (a z-scored or offset image) are measured from the image's floor."""
    image, cord, mask = _scene()
    shifted = image - 60.0  # cord 40, bright lesion 90, background -40
    # measured from the floor (-40): bright 130/80, faint 83/80; the same two are dropped
    kept, dropped = lesions.screen_lesions(mask, shifted, cord, 1.1)
    assert kept[16:19, 16:19, 2:4].all() and not kept[22:25, 22:25, 6:8].any() and dropped == 2


def test_no_judgement_without_enough_cord():
    """Where the cord on a lesion's slices is nearly all lesion, the lesion is kept (nothing to compare)."""
    image = np.full((20, 20, 4), 10.0, np.float32)
    cord = np.zeros(image.shape, np.uint8)
    cord[8:12, 8:12, 1:3] = 1
    mask = cord.copy()
    kept, dropped = lesions.screen_lesions(mask, image, cord, 1.1)
    assert dropped == 0 and np.array_equal(kept, mask)


def test_empty_mask_is_returned_unchanged():
    image, cord, _ = _scene()
    empty = np.zeros(image.shape, np.uint8)
    kept, dropped = lesions.screen_lesions(empty, image, cord, 1.1)
    assert dropped == 0 and not kept.any()


@pytest.mark.slow
def test_min_contrast_zero_is_the_thresholded_soft_map():
    ph = make_phantom((48, 48, 24), axcodes=("R", "P", "I"), seed=2)
    soft = np.asarray(cordseg.segment_lesions(ph.image, "t2", soft=True).dataobj)
    raw = np.asarray(cordseg.segment_lesions(ph.image, "t2", min_contrast=0).dataobj)
    threshold = cordseg.inference.find_model("lesion", "t2").threshold
    assert np.array_equal(raw, (soft >= threshold).astype(np.uint8))
    screened = np.asarray(cordseg.segment_lesions(ph.image, "t2").dataobj)
    assert (screened <= raw).all()  # screening only removes whole lesions


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_min_contrast_is_refused(bad):
    ph = make_phantom((24, 24, 8), seed=0)
    with pytest.raises(InputError, match="min_contrast"):
        cordseg.segment_lesions(ph.image, "t2", min_contrast=bad)


def test_lesion_slabs_join_nearby_lesions_only():
    mask = np.zeros((8, 8, 100), np.uint8)
    mask[2, 2, [3, 4, 10, 60, 61, 99]] = 1
    assert lesions.lesion_slabs(mask, merge_gap=10) == [(3, 10), (60, 61), (99, 99)]
    assert lesions.lesion_slabs(mask, merge_gap=40) == [(3, 10), (60, 99)]
    assert lesions.lesion_slabs(mask, merge_gap=50) == [(3, 99)]
    assert lesions.lesion_slabs(np.zeros((4, 4, 4), np.uint8), merge_gap=5) == []


def test_screening_without_a_cord_model_warns_and_keeps_the_mask(tmp_path, tiny_onnx, monkeypatch):
    """A lesion model for a contrast that no cord model serves cannot be screened: the command says so and
    reports the thresholded map. (The shipped cord model serves every contrast: here it is hidden.)"""
    from cordseg import segmenter
    from cordseg.errors import CordsegWarning, ModelError

    real_find = segmenter.find_model

    def no_cord_model(task, contrast, *args, **kwargs):
        if task == "sc":
            raise ModelError(f"no 'sc' model for contrast '{contrast}'")
        return real_find(task, contrast, *args, **kwargs)

    monkeypatch.setattr(segmenter, "find_model", no_cord_model)

    model = tiny_onnx(tmp_path / "bright.onnx", op="sigmoid", task="lesion", input_shape=("N", 48, 48, 48, 1),
                      extra={"cordseg_threshold": "0.8", "cordseg_contrast": "dwi",
                             "cordseg_min_lesion_contrast": "1.1"})
    ph = make_phantom((40, 40, 16), seed=1)
    soft = np.asarray(cordseg.segment_lesions(ph.image, "dwi", soft=True, model=model).dataobj)
    with pytest.warns(CordsegWarning, match="lesion screening skipped"):
        mask = np.asarray(cordseg.segment_lesions(ph.image, "dwi", model=model).dataobj)
    assert mask.any() and np.array_equal(mask, (soft >= 0.8).astype(np.uint8))


def _grey_matter_scene():
    """A round cord (radius 5 voxels, white matter 100) bending across 30 slices of 1 mm, with grey matter
    125 in its middle on every slice and the slices shaded from 1x to 2x; two candidate lesions: the grey
    matter itself on slices 10-13, and a faint lesion (1.15x the white matter) beside it on slices 18-21."""
    image = np.full((40, 40, 30), 20.0, np.float32)
    cord = np.zeros(image.shape, np.uint8)
    gm, les = np.zeros(image.shape, bool), np.zeros(image.shape, bool)
    gx, gy = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    for z in range(30):
        cx, cy = 20 + 3 * np.sin(z / 8), 20
        r = np.hypot(gx - cx, gy - cy)
        cord[:, :, z] = r <= 5
        gm[:, :, z] = r <= 1.5
        les[:, :, z] = (np.hypot(gx - cx - 3, gy - cy) <= 1.2) & (18 <= z <= 21)
        image[:, :, z][r <= 5] = 100.0
        image[:, :, z][gm[:, :, z]] = 125.0
        image[:, :, z][les[:, :, z]] = 115.0
        image[:, :, z] *= 1.0 + z / 29
    mask = ((gm & (np.arange(30) >= 10) & (np.arange(30) <= 13)) | les).astype(np.uint8)
    return image, cord, mask, les


def test_local_contrast_tells_grey_matter_from_a_faint_lesion():
    """Against the cord's median on its slices the grey matter looks like a lesion (1.25x) and brighter than
    the faint lesion (1.15x); against the same places on the slices above and below, it is about 1.0
    and the lesion 1.15."""
    image, cord, mask, les = _grey_matter_scene()
    labels, ordinary = lesions.lesion_contrasts(mask, image, cord)
    local = lesions.local_contrasts(labels, image, cord, (1.0, 1.0, 1.0))
    g, f = int(labels[(mask > 0) & ~les].max()), int(labels[les].max())
    assert g != f and labels.max() == 2
    assert ordinary[g - 1] > ordinary[f - 1] > 1.1
    # measured 1.04 (the reference is interpolated between voxels as the cord bends) and 1.14
    assert local[g - 1] < 1.06
    assert local[f - 1] == pytest.approx(1.15, abs=0.03)
    # the same in other units; on an offset image, measured from its floor, the same verdicts
    np.testing.assert_allclose(lesions.local_contrasts(labels, image * 1e-6, cord, (1.0, 1.0, 1.0)), local, rtol=1e-4)
    shifted = lesions.local_contrasts(labels, image - 50.0, cord, (1.0, 1.0, 1.0))
    assert shifted[g - 1] < 1.06 < 1.12 < shifted[f - 1]


def test_local_contrast_needs_cord_above_or_below():
    image, cord, mask, _ = _grey_matter_scene()
    cord[:, :, :9] = 0
    cord[:, :, 15:] = 0  # cord only on slices 9-14: the grey-matter candidate's reference slices are gone
    from cordseg.metrics import label_lesions

    labels, _ = label_lesions(mask * cord)
    assert lesions.local_contrasts(labels, image, cord, (1.0, 1.0, 1.0)) == [None]


def test_screening_cord_reaches_beyond_the_lesions_for_the_local_contrast(monkeypatch):
    """The cord is segmented along the lesions' slabs, and `margin` slices beyond them (the local contrast's
    reference slices); stretches closer than a patch depth plus both margins are one run."""
    from types import SimpleNamespace

    from cordseg import segmentation
    from cordseg.centerline import Centerline
    from cordseg.orientation import to_rpi

    ph = make_phantom((32, 32, 80), seed=0)
    rpi = to_rpi(ph.image)
    zs = np.arange(80)
    cl = Centerline(zs, np.full(80, 16.0), np.full(80, 16.0), rpi)
    runs = []

    def fake(stretch, model, progress=None, stage="", on_stage=None):
        runs.append((int(stretch.z.min()), int(stretch.z.max())))
        return np.zeros(rpi.shape, np.float32)

    monkeypatch.setattr(segmentation, "soft_segmentation", fake)
    model = SimpleNamespace(patch_shape=(8, 8, 4), voxel_size=(1.0, 1.0, 1.0), threshold=0.5)
    mask = np.zeros(rpi.shape, np.uint8)
    mask[16, 16, 30:33] = 1
    lesions.cord_along_lesions(mask, cl, model)
    assert runs == [(29, 33)]
    runs.clear()
    lesions.cord_along_lesions(mask, cl, model, margin=10)
    assert runs == [(19, 43)]
    runs.clear()
    mask[16, 16, 52] = 1  # 20 slices on: two runs without a margin, one with margins of 10 (their reaches meet)
    lesions.cord_along_lesions(mask, cl, model)
    assert runs == [(29, 33), (51, 53)]
    runs.clear()
    lesions.cord_along_lesions(mask, cl, model, margin=10)
    assert runs == [(19, 63)]


def test_screening_cord_takes_the_threshold_for_the_images_contrast(monkeypatch):
    """The screening cord is thresholded as `cordseg sc` thresholds that contrast, not at the model's common
    threshold when the model names one of its own for the contrast."""
    from types import SimpleNamespace

    from cordseg import segmentation
    from cordseg.centerline import Centerline
    from cordseg.orientation import to_rpi

    ph = make_phantom((32, 32, 40), seed=0)
    rpi = to_rpi(ph.image)
    cl = Centerline(np.arange(40), np.full(40, 16.0), np.full(40, 16.0), rpi)
    prob = np.zeros(rpi.shape, np.float32)
    prob[14:18, 14:18, :] = 0.3
    monkeypatch.setattr(segmentation, "soft_segmentation", lambda *a, **k: prob)
    model = SimpleNamespace(patch_shape=(8, 8, 4), voxel_size=(1.0, 1.0, 1.0), threshold=0.5)
    mask = np.zeros(rpi.shape, np.uint8)
    mask[16, 16, 20] = 1
    assert not lesions.cord_along_lesions(mask, cl, model).any()
    assert lesions.cord_along_lesions(mask, cl, model, threshold=0.2)[16, 16, 20] == 1


def _long_cord(noise=0.0, seed=0, nz=60):
    """A straight 12-voxel-wide square cord of 100 over `nz` 1 mm slices, with Gaussian noise of sd `noise`."""
    rng = np.random.default_rng(seed)
    image = np.full((40, 40, nz), 20.0, np.float32)
    cord = np.zeros(image.shape, np.uint8)
    cord[14:26, 14:26, :] = 1
    image[cord > 0] = 100.0
    image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    return image, cord


def test_null_contrasts_move_each_lesions_shape_along_the_cord():
    """On a clean cord the lesion's shape measures 1.0 wherever it is moved; the places keep clear of the
    lesion's own slices and of every other lesion."""
    image, cord = _long_cord()
    mask = np.zeros(image.shape, np.uint8)
    mask[18:21, 18:21, 28:32] = 1  # 4 slices: moved in steps of 2, never within 4 slices of itself
    image[mask > 0] = 108.0
    labels, _ = lesions.lesion_contrasts(mask, image, cord)
    (null,) = lesions.null_contrasts(labels, image, cord, (1.0, 1.0, 1.0))
    assert null.size >= 20 and np.allclose(null, 1.0, atol=1e-6)
    # a second lesion takes its places (and their dilation) out of the first one's
    mask[18:21, 18:21, 8:12] = 1
    labels, _ = lesions.lesion_contrasts(mask, image, cord)
    assert all(n.size < null.size for n in lesions.null_contrasts(labels, image, cord, (1.0, 1.0, 1.0)))


def test_adaptive_screening_keeps_a_faint_lesion_on_a_clean_scan():
    """A 1.08x lesion: under the fixed local bar (1.12) it is dropped; the clean scan's own bar (1.0 elsewhere,
    raised to the floor 1.05) keeps it."""
    image, cord = _long_cord(noise=0.5)
    mask = np.zeros(image.shape, np.uint8)
    mask[18:21, 18:21, 28:32] = 1
    image[mask > 0] *= 1.08
    zooms = (1.0, 1.0, 1.0)
    assert lesions.screen_lesions(mask, image, cord, 1.12, measure="local", zooms=zooms)[1] == 1
    kept, dropped = lesions.screen_lesions(mask, image, cord, 1.12, measure="adaptive", zooms=zooms)
    assert dropped == 0 and (kept == mask).all()
    # under the floor it goes, however clean the scan
    assert lesions.screen_lesions(mask, image, cord, 1.12, measure="adaptive", zooms=zooms, floor=1.1)[1] == 1
    # within the local reach (20 mm) of the cord's end the scan's middle says nothing: the fixed bar judges
    end = np.zeros(image.shape, np.uint8)
    end[18:21, 18:21, 50:54] = 1
    image[end > 0] *= 1.08
    labels, _ = lesions.lesion_contrasts(mask | end, image, cord)
    nulls = lesions.null_contrasts(labels, image, cord, zooms)
    assert nulls[labels[19, 19, 51] - 1].size == 0 and nulls[labels[19, 19, 29] - 1].size >= 15
    kept, dropped = lesions.screen_lesions(mask | end, image, cord, 1.12, measure="adaptive", zooms=zooms)
    assert dropped == 1 and kept[18:21, 18:21, 28:32].all() and not kept[18:21, 18:21, 50:54].any()


def test_adaptive_screening_drops_what_the_scan_repeats_along_the_cord():
    """A bright spot that recurs every 12 slices at the same place of the cord (1.2-1.25x), as anatomy or an
    artefact would: its local contrast passes the fixed bar, and the same shape elsewhere on this scan
    measures more, so the adaptive bar drops it. A lesion elsewhere in the cord, no brighter, is kept."""
    image, cord = _long_cord(noise=0.5)
    for z in range(4, 60, 12):
        image[15:17, 15:17, z:z + 2] *= 1.2 if z == 28 else 1.25
    mask = np.zeros(image.shape, np.uint8)
    mask[15:17, 15:17, 28:30] = 1  # one of the recurring spots
    mask[21:24, 21:24, 40:43] = 1  # a lesion
    image[21:24, 21:24, 40:43] *= 1.2
    labels, _ = lesions.lesion_contrasts(mask, image, cord)
    spot, lesion = int(labels[15, 15, 28]), int(labels[22, 22, 41])
    local = lesions.local_contrasts(labels, image, cord, (1.0, 1.0, 1.0))
    assert local[spot - 1] > 1.12 and local[lesion - 1] > 1.12
    kept, dropped = lesions.screen_lesions(mask, image, cord, 1.12, measure="adaptive", zooms=(1.0, 1.0, 1.0))
    assert dropped == 1 and not kept[15:17, 15:17, 28:30].any() and kept[21:24, 21:24, 40:43].all()


def test_adaptive_screening_takes_the_fixed_bar_where_the_cord_is_too_short():
    """Too few places to move a lesion to (a cord of 12 slices): the model's fixed bar judges it."""
    image, cord = _long_cord(noise=0.5, nz=12)
    mask = np.zeros(image.shape, np.uint8)
    mask[18:21, 18:21, 5:9] = 1
    image[mask > 0] *= 1.08
    labels, _ = lesions.lesion_contrasts(mask, image, cord)
    assert lesions.null_contrasts(labels, image, cord, (1.0, 1.0, 1.0))[0].size < lesions.ADAPTIVE_MIN_PLACES
    assert lesions.screen_lesions(mask, image, cord, 1.12, measure="adaptive", zooms=(1.0, 1.0, 1.0))[1] == 1
    assert lesions.screen_lesions(mask, image, cord, 1.05, measure="adaptive", zooms=(1.0, 1.0, 1.0))[1] == 0


@pytest.mark.slow
def test_the_models_screening_is_adaptive_and_a_named_bar_is_fixed(monkeypatch):
    """The shipped lesion model screens with the scan's own bar, then grows the kept lesions to their local
    edge; a min_contrast the caller names is one fixed bar for every lesion, measured against the same places
    above and below; min_contrast=0 is the thresholded map, neither screened nor grown."""
    seen, grown = [], []
    real_screen, real_grow = lesions.screen_lesions, lesions.grow_to_local_edge

    def spy(*args, **kwargs):
        seen.append((args[3], kwargs["measure"]))
        return real_screen(*args, **kwargs)

    def spy_grow(*args):
        grown.append(args[5:])
        return real_grow(*args)

    monkeypatch.setattr(lesions, "screen_lesions", spy)
    monkeypatch.setattr(lesions, "grow_to_local_edge", spy_grow)
    ph = make_phantom((48, 48, 40), seed=3, n_lesions=3)
    cordseg.segment_lesions(ph.image, "t2")
    cordseg.segment_lesions(ph.image, "t2", min_contrast=1.05)
    assert seen == [(pytest.approx(1.12), "adaptive"), (pytest.approx(1.05), "local")]
    assert grown == [(0.5, 0.1), (0.5, 0.1)]
    cordseg.segment_lesions(ph.image, "t2", min_contrast=0)
    assert len(seen) == 2 and len(grown) == 2


def test_growth_to_the_local_edge_takes_the_rim_the_network_half_sees():
    """A faint lesion's bright core (1.3x) is the mask; its rim (1.2x) joins where the map gives >= 0.1, one
    voxel deep; a normal voxel the map half-sees stays out, and so does a bright one the map does not see."""
    image, cord = _long_cord(noise=0.2)
    prob = np.zeros(image.shape, np.float32)
    core = np.zeros(image.shape, bool)
    core[19:21, 19:21, 29:31] = True
    rim = ndi.binary_dilation(core, ndi.generate_binary_structure(3, 1)) & ~core
    image[core] *= 1.3
    image[rim] *= 1.2
    prob[core], prob[rim] = 0.9, 0.3
    unseen = (18, 19, 29)  # a rim voxel the map does not see
    prob[unseen] = 0.05
    normal = (17, 19, 29)  # next ring: normal cord, half-seen
    prob[normal] = 0.3
    grown = lesions.grow_to_local_edge(core.astype(np.uint8), prob, image, cord, (1.0, 1.0, 1.0), 0.5, 0.1)
    assert grown.dtype == np.uint8 and grown[core].all()
    seen_rim = rim.copy()
    seen_rim[unseen] = False
    assert grown[seen_rim].all() and not grown[unseen] and not grown[normal]
    assert grown.sum() == core.sum() + seen_rim.sum()
    # a rim only as bright as a quarter of the core's contrast stays out at share 0.5
    image[rim] /= 1.2 / 1.07
    assert (lesions.grow_to_local_edge(core.astype(np.uint8), prob, image, cord, (1.0, 1.0, 1.0), 0.5, 0.1)
            == core).all()


def test_growth_to_the_local_edge_stays_on_its_slices_when_they_are_thick():
    image, cord = _long_cord(noise=0.2)
    core = np.zeros(image.shape, bool)
    core[19:21, 19:21, 29:31] = True
    image[ndi.binary_dilation(core, iterations=2)] *= 1.3
    prob = np.where(ndi.binary_dilation(core, iterations=2), 0.5, 0.0).astype(np.float32)
    grown = lesions.grow_to_local_edge(core.astype(np.uint8), prob, image, cord, (1.0, 1.0, 5.0), 0.5, 0.1)
    assert grown[core].all() and grown[18, 19, 29] and not grown[:, :, 28].any() and not grown[:, :, 31].any()
