"""bench/lesion_sets.py (the evaluation's lesion insertion) and bench/lesion_eval.py's scoring, on a synthetic
cord with known answers; one real-data check on the thick-slice mt0 scan."""
import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cordseg import metrics

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))  # lesion_eval imports lesion_sets by name
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


sets = _load("lesion_sets")
ev = _load("lesion_eval")


def phantom(zooms=(0.8, 0.8, 1.0), shape=(36, 36, 40), seed=0):
    """An axial (RAS) image: cord (elliptic cylinder, 100 with noise) inside a CSF ring (300)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid((np.arange(shape[0]) - shape[0] / 2) * zooms[0],
                       (np.arange(shape[1]) - shape[1] / 2) * zooms[1], indexing="ij")
    r = np.sqrt((x / 5.5) ** 2 + (y / 4.5) ** 2)
    cord2d = r <= 1.0
    data = np.where(cord2d, 100.0, np.where(r <= 1.6, 300.0, 60.0))[:, :, None] * np.ones(shape[2])
    data = data + rng.normal(0, 4, shape)
    cord = np.repeat(cord2d[:, :, None], shape[2], axis=2)
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([*zooms, 1.0]))
    return img, cord


def _insert(proc, bands, seed=1, **kw):
    img, cord = phantom(**kw)
    new, labels, truths = sets.insert(img, cord, np.random.default_rng(seed), proc, bands)
    return img, cord, new, labels, truths


PROCS = ["tube", "field"]


@pytest.mark.slow
@pytest.mark.parametrize("proc", PROCS)
def test_lesions_inside_cord_with_volume_and_ratio(proc):
    img, cord, new, labels, truths = _insert(proc, [0, 1, 0])
    old = np.asarray(img.dataobj)
    assert 1 <= len(truths) <= 3
    assert labels.any() and not (labels[~cord] > 0).any()  # intramedullary
    assert np.array_equal(new[~cord], old[~cord])  # intensity changed on cord voxels only
    vox = float(np.prod(img.header.get_zooms()[:3]))
    _, n = metrics.label_lesions(labels > 0)
    assert n == len(truths)  # separate 26-connected lesions
    for t in truths:
        m = labels == t.label
        assert t.voxels == m.sum() and t.volume_mm3 == pytest.approx(m.sum() * vox)
        assert sets.VOLUME_MM3[0] <= t.volume_mm3 <= sets.VOLUME_MM3[1]
        lo, hi = (float(v) for v in t.band.split("-"))
        # the ratio recorded is the one in the image, and it is in its band
        ks = np.flatnonzero(m.any(axis=(0, 1)))
        med = np.median(old[:, :, ks.min():ks.max() + 1][cord[:, :, ks.min():ks.max() + 1]])
        realised = new[m].mean() / med
        assert realised == pytest.approx(t.ratio, abs=2e-3)
        assert lo <= realised <= hi + 1e-3
        assert t.ratio == pytest.approx(t.target_ratio, abs=2e-3)
        assert t.slices >= 2  # elongated along the cord (1 mm slices, lengths >= 5 mm)


@pytest.mark.parametrize("proc", PROCS)
def test_partial_volume_on_thick_slices(proc):
    img, cord, new, labels, truths = _insert(proc, [1, 1], seed=3, zooms=(0.8, 0.8, 6.0), shape=(36, 36, 10))
    old = np.asarray(img.dataobj)
    changed = np.abs(new - old) > 1e-3
    # voxels partly filled by a lesion change without being lesion: partial volume, not a hard mask
    assert (changed & (labels == 0)).any()
    assert changed.sum() > (labels > 0).sum()


def test_fine_box_average_is_partial_volume():
    box = sets.FineBox([0, 0, 0], [2, 2, 1], (0.8, 0.8, 6.0))
    assert box.n[2] >= 15  # thick slices are sampled finely along the slice axis
    _, _, z = np.meshgrid(*box.axes, indexing="ij")
    frac = box.average((z < 0).astype(np.float32))  # the lower half of the slice
    assert frac.shape == (2, 2, 1)
    np.testing.assert_allclose(frac, 0.5, atol=1 / box.n[2])


@pytest.mark.parametrize("proc", PROCS)
def test_deterministic_by_seed(proc):
    _, _, a, la, ta = _insert(proc, [0, 1], seed=5)
    _, _, b, lb, tb = _insert(proc, [0, 1], seed=5)
    _, _, c, lc, _ = _insert(proc, [0, 1], seed=6)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and [t.ratio for t in ta] == [t.ratio for t in tb]
    assert not np.array_equal(la, lc)


def test_procedures_differ():
    _, _, _, la, _ = _insert("tube", [1], seed=2)
    _, _, _, lb, _ = _insert("field", [1], seed=2)
    assert not np.array_equal(la, lb)


def test_gm_butterfly_inside_cord():
    img, cord = phantom()
    old = np.asarray(img.dataobj)
    new, share = sets.gm_butterfly(img, cord, 1.12)
    assert 0.1 < share < 0.5
    assert np.array_equal(new[~cord], old[~cord])
    gain = new[cord] / old[cord]
    assert gain.min() >= 1.0 - 1e-6 and gain.max() <= 1.12 + 1e-5 and (gain > 1.1).any()


# ------------------------------------------------------------------------------------------ scoring


def _ref_two():
    ref = np.zeros((20, 20, 20), np.int16)
    ref[2:4, 2:4, 2:4] = 1  # 8 voxels
    ref[10:15, 10:12, 10:12] = 2  # 20 voxels
    return ref


def test_25_percent_rule_and_10_percent_rule():
    ref = _ref_two()
    pred = np.zeros(ref.shape, bool)
    pred[2, 2, 2:4] = True  # 2 of 8 = 25%: not found (> 25% needed), found under the 10% rule
    pred[10, 10:12, 10:12] = True  # 4 of 20 = 20%
    pred[10, 10, 12] = True  # ...plus one outside, same component
    s = ev.score_case(pred, ref)
    assert s["n_ref"] == 2 and s["n_pred"] == 2
    assert s["found25"] == 0 and s["tp_pred25"] == 0 and s["fp25"] == 2
    assert s["tp10"] == 2 and s["fn10"] == 0 and s["fp10"] == 0
    assert [round(p["covered_share"], 3) for p in s["lesions"]] == [0.25, 0.2]
    pred[3, 2, 2] = True  # 3 of 8 > 25%
    s = ev.score_case(pred, ref)
    assert s["found25"] == 1 and s["tp_pred25"] == 1
    assert [p["found25"] for p in s["lesions"]] == [True, False]


def test_false_positive_f1_and_precision():
    ref = _ref_two()
    pred = np.zeros(ref.shape, bool)
    pred[2:4, 2:4, 2:4] = True  # lesion 1 whole
    pred[17:19, 17:19, 17:19] = True  # touches nothing
    s = ev.score_case(pred, ref)
    assert (s["found25"], s["tp_pred25"], s["fp25"]) == (1, 1, 1)
    assert (s["tp10"], s["fp10"], s["fn10"]) == (1, 1, 1)
    assert ev.f1_10(s["tp10"], s["fp10"], s["fn10"]) == pytest.approx(1 / (1 + 1))
    p = ev.pooled([s, s])
    assert p["sensitivity25"] == pytest.approx(0.5) and p["precision25"] == pytest.approx(0.5)
    assert s["dice"] == pytest.approx(2 * 8 / (16 + 28))


def test_touching_counts_under_10_percent_not_25():
    ref = _ref_two()
    pred = np.zeros(ref.shape, bool)
    pred[14, 10, 10] = True  # 1 of 20 voxels of lesion 2: touches it (no FP at 10%) but finds nothing
    s = ev.score_case(pred, ref)
    assert s["fp10"] == 0 and s["tp10"] == 0 and s["fn10"] == 2
    assert s["fp25"] == 1 and s["found25"] == 0


def test_25_percent_counts_match_cordseg_metrics():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ref = np.zeros((16, 16, 16), np.int16)
        k = 0
        for c in rng.integers(1, 13, (3, 3)):
            k += 1
            ref[c[0]:c[0] + 3, c[1]:c[1] + 2, c[2]:c[2] + 4] = np.where(ref[c[0]:c[0] + 3, c[1]:c[1] + 2,
                                                                          c[2]:c[2] + 4] == 0, k, 0)
        ref, _ = metrics.label_lesions(ref > 0)  # one label per component, as the sets write them
        pred = rng.random(ref.shape) < 0.02
        pred |= np.roll(ref > 0, rng.integers(-2, 3), axis=0) & (rng.random(ref.shape) < 0.6)
        s = ev.score_case(pred, ref)
        d = metrics.lesion_detection(pred, ref > 0)
        assert (s["n_pred"], s["n_ref"], s["tp_pred25"], s["found25"]) == (d.n_pred, d.n_ref, d.tp_pred, d.tp_ref)


def test_parse_value():
    assert ev.parse_value("0") == 0 and ev.parse_value("0.3") == 0.3 and ev.parse_value("none") is None
    assert ev.parse_value("true") is True and ev.parse_value("t2s") == "t2s"


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("proc", PROCS)
def test_insertion_on_thick_mt0(shared_data, proc):
    img = nib.load(str(shared_data / "sct_testing/mt/mt0.nii.gz"))
    cord = np.asarray(nib.load(str(shared_data / "sct_testing/mt/mt0_seg.nii.gz")).dataobj) > 0.5
    new, labels, truths = sets.insert(img, cord, np.random.default_rng(4), proc, [0, 1])
    assert truths and not (labels[~cord] > 0).any()
    assert np.array_equal(new[~cord], np.asarray(img.dataobj, np.float32)[~cord])
    for t in truths:
        lo, hi = (float(v) for v in t.band.split("-"))
        assert lo <= t.ratio <= hi + 1e-3
        assert sets.VOLUME_MM3[0] <= t.volume_mm3 <= sets.VOLUME_MM3[1]


def test_no_lesion_below_where_the_cord_begins(shared_data, tmp_path):
    """A background's `cord_from` (the lumbar scan: above the conus tip, not in the nerve roots) empties its cord
    mask below that slice, so no lesion can be inserted there."""
    bg = sets.Background("t2_cut", "sct_testing/t2/t2.nii.gz", "sct_testing/t2/t2_seg-manual.nii.gz", "t2",
                         "sct_testing", cord_from=20)
    full = sets.cord_mask(sets.Background("t2", bg.image, bg.cord, "t2", "sct_testing"), shared_data, tmp_path)
    cut = sets.cord_mask(bg, shared_data, tmp_path)
    assert full[:, :, :20].any() and not cut[:, :, :20].any()
    np.testing.assert_array_equal(cut[:, :, 20:], full[:, :, 20:])
    lumbar = [b for b in sets.BACKGROUNDS if b.name == "lumbar"][0]
    assert lumbar.cord_from is not None and lumbar.cord_from > 102  # the tip read by eye: slices 95-102
