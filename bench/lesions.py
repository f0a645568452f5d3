"""Lesion model on lesions inserted into real scans by a procedure independent of training.

python bench/lesions.py [--seed 0] [--n 12] [--json FILE] [--data DIR]

No human-labelled real spinal MS lesion exists here (../shared/FACTS.md), so the shipped lesion model
(cordseg.segment_lesions) is measured on lesions written into real, lesion-free scans with their reference cord
masks, by a procedure that shares nothing with training/synth.insert_lesions:

- shape: a smooth ellipsoid or an ellipsoid whose radius is perturbed by random real spherical harmonics
  (degrees 2-4), elongated along the slice (inferior-superior) axis; on thick-slice scans the extent along
  that axis is tied to the slice thickness (the lesion fills its slice) and only the in-plane size scales;
- intensity: multiplicative on the real voxels, I' = I * (1 + (g - 1) * w), with w a Gaussian profile
  (1 at the centre, 1/2 on the lesion boundary, gone at twice the radius) averaged over sub-voxels (partial
  volume); g is solved so that mean(I' in the lesion) / (median real cord intensity on the lesion's slices)
  equals a drawn lesion/cord ratio (1.3-2.0: hyper-intense, T2-like and T2*-like scans);
- placement: on the native voxel grid (no resampling; the header is kept), centres inside the cord, lesion and
  intensity change clipped to the reference cord mask, 5-500 mm3 each (the cord's cross-section caps it),
  1-4 per scan, intensity footprints disjoint and reference lesions separate 26-connected components.

The reference lesion mask is the set of cord voxels at least half inside the shape (the half-maximum contour
of the profile). Each case is scored with cordseg.metrics (voxel Dice, the paper's 25% lesion-wise rule) on
the mask `cordseg lesion` writes (threshold, then lesion screening: `--min-contrast`); the unmodified scans
give false positives on lesion-free scans; thresholds 0.1-0.5 are swept on the unscreened soft map (report
only: the model's own threshold is what ships); the real MS scan unlabeled/t2_ms_axial is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.special import sph_harm_y

import cordseg
from cordseg import metrics
from cordseg.datasets import shared_data
from cordseg.inference import find_model
from cordseg.io import image_like

SCANS = [  # image, reference cord mask, contrast the model is asked for
    ("sct_testing/t2/t2.nii.gz", "sct_testing/t2/t2_seg-manual.nii.gz", "t2"),
    ("unf01/sub-unf01_T2w.nii.gz", "unf01/sub-unf01_T2w_seg-manual.nii.gz", "t2"),
    ("sct_testing/mt/mt0.nii.gz", "sct_testing/mt/mt0_seg.nii.gz", "t2s"),
]
MS_SCAN = ("unlabeled/t2_ms_axial.nii.gz", "t2")
PUBLISHED_MS = "4 small intramedullary lesions, 82 voxels (~291 mm3)"  # ../shared/FACTS.md
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
RATIO = {"t2": (1.3, 2.0), "t2s": (1.3, 2.0)}  # lesion / cord, hyper-intense on T2- and T2*-like scans
VOLUME_MM3 = (5.0, 500.0)
COUNT = (1, 4)
THICK = 2.5  # slice thickness / in-plane size above which a scan counts as thick-slice
CORD_FRACTION = 0.6  # in-plane equivalent radius <= this share of the cord's equivalent radius
TAIL = 2.0  # the Gaussian profile is cut at this multiple of the radius (w = 1/16 there)
LN2 = float(np.log(2.0))


def default_data() -> Path:
    return shared_data()


# ------------------------------------------------------------------------------------------ insertion


@dataclass
class InsertedLesion:
    label: int
    shape: str  # "ellipsoid" or "harmonic"
    centre_vox: list  # native voxel coordinates
    target_mm3: float
    volume_mm3: float
    ratio: float  # measured: mean(new image in lesion) / local cord intensity
    requested_ratio: float
    peak_gain: float
    local_cord: float


@dataclass
class Insertion:
    image: np.ndarray  # float32, native grid
    labels: np.ndarray  # int16, 0 = none, k = lesion k (native grid)
    lesions: list = field(default_factory=list)
    n_wanted: int = 0  # lesions drawn; fewer are placed when the cord has no room left
    rejected: dict = field(default_factory=dict)  # candidate draws turned down, by reason


def _subsample_offsets(zooms):
    """Sub-voxel sample offsets per axis (in voxels) so that partial volume is resolved at ~1/3 of the finest
    voxel side: thick slices get many samples along the slice axis."""
    fine = min(zooms)
    out = []
    for z in zooms:
        n = int(min(9, max(3, np.ceil(3 * z / fine))))
        out.append((np.arange(n) + 0.5) / n - 0.5)
    return out


def _harmonic_perturbation(rng, amplitude):
    """A random smooth function on the sphere: real spherical harmonics of degree 2-4, scaled so that its
    largest absolute value is `amplitude`. Returns f(polar, azimuth), tabulated (2 degree steps) and
    interpolated linearly, since evaluating 21 harmonics on every sub-sample is slow."""
    pol, az = np.meshgrid(np.linspace(0, np.pi, 91), np.linspace(0, 2 * np.pi, 181), indexing="ij")
    table = np.zeros(pol.shape)
    for n in (2, 3, 4):
        for m in range(-n, n + 1):
            y = sph_harm_y(n, abs(m), pol, az)
            table += rng.normal(0.0, 1.0 / n) * (np.sqrt(2) * (y.real if m > 0 else y.imag) if m else y.real)
    table *= amplitude / np.abs(table).max()

    def f(polar, azimuth):
        coords = np.stack([np.ravel(polar) * (90 / np.pi), np.mod(np.ravel(azimuth), 2 * np.pi) * (90 / np.pi)])
        return ndi.map_coordinates(table, coords, order=1, mode="nearest").reshape(np.shape(polar))

    return f


class _Shape:
    """A lesion shape around a centre, in mm; `rho(offsets_mm, s)` is 1 on its boundary, s being the in-plane
    equivalent radius (mm). Away from thick slices every axis scales with s, so rho(d, s) = rho(d, 1) / s."""

    def __init__(self, rng, thick, slice_mm):
        self.kind = "harmonic" if rng.random() < 0.5 else "ellipsoid"
        ratio = rng.uniform(0.6, 1.0)  # in-plane aspect, equal-area normalised
        self.axes = np.array([1.0 / np.sqrt(ratio), np.sqrt(ratio), rng.uniform(1.0, 3.0)])
        self.angle = rng.uniform(0, np.pi)
        self.thick = thick
        # thick slices: half-length along the slice axis fixed so the lesion fills its slice
        self.half_z = rng.uniform(0.55, 0.8) * slice_mm if thick else None
        self.pert = _harmonic_perturbation(rng, rng.uniform(0.15, 0.35)) if self.kind == "harmonic" else None

    def rho(self, d, s):
        """d: (..., 3) offsets in mm from the centre (slice axis last)."""
        c, sn = np.cos(self.angle), np.sin(self.angle)
        u = (c * d[..., 0] + sn * d[..., 1]) / (s * self.axes[0])
        v = (-sn * d[..., 0] + c * d[..., 1]) / (s * self.axes[1])
        w = d[..., 2] / (self.half_z if self.thick else s * self.axes[2])
        r = np.sqrt(u * u + v * v + w * w)
        if self.pert is None:
            return r
        polar = np.arccos(np.clip(np.divide(w, r, out=np.zeros_like(r), where=r > 0), -1, 1))
        return r / (1.0 + self.pert(polar, np.arctan2(v, u)))


class _Fields:
    """Sub-sampled offsets of a voxel box from a lesion centre, and per-voxel occupancy / profile for a size s:
    occupancy = share of sub-samples inside the shape; profile = mean over sub-samples of the Gaussian
    exp(-ln2 rho^2), cut at rho = TAIL (partial volume on the native grid)."""

    def __init__(self, shape, centre, box, offsets, zooms):
        self.shape = shape
        grids = []
        for ax, (sl, off) in enumerate(zip(box, offsets)):
            pos = np.arange(sl.start, sl.stop)[:, None] + off[None, :]  # (n_vox, n_sub)
            grids.append(((pos - centre[ax]) * zooms[ax]).ravel())
        self.d = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1)
        n = [len(o) for o in offsets]
        dims = [sl.stop - sl.start for sl in box]
        self.blk = (dims[0], n[0], dims[1], n[1], dims[2], n[2])
        self.r1 = None if shape.thick else shape.rho(self.d, 1.0)

    def rho(self, s):
        return self.r1 / s if self.r1 is not None else self.shape.rho(self.d, s)

    def occupancy(self, s):
        return (self.rho(s) <= 1.0).reshape(self.blk).mean(axis=(1, 3, 5))

    def profile(self, s):
        r = self.rho(s)
        return np.where(r <= TAIL, np.exp(-LN2 * r * r), 0.0).reshape(self.blk).mean(axis=(1, 3, 5))


def insert_lesions(image, cord, zooms, slice_axis, rng, *, count=COUNT, volume_mm3=VOLUME_MM3,
                   ratio=(1.3, 2.0), max_tries=60) -> Insertion:
    """Write 1-4 lesions into a real scan on its native grid (see the module docstring).

    image: real scan (native voxel order); cord: its reference cord mask; zooms: native voxel sizes (mm);
    slice_axis: the native voxel axis closest to inferior-superior. Returns the new image (float32), the
    lesion labels and one InsertedLesion per lesion (the count may fall short of the draw when the cord has
    no room left; at least one is always placed or RuntimeError is raised).
    """
    img = np.moveaxis(np.asarray(image, np.float32), slice_axis, -1)
    cord = np.moveaxis(np.asarray(cord) > 0.5, slice_axis, -1)
    zooms = np.asarray(zooms, float)[[a for a in range(3) if a != slice_axis] + [slice_axis]]
    if not cord.any():
        raise ValueError("empty cord mask")
    vox = float(np.prod(zooms))
    thick = zooms[2] >= THICK * min(zooms[:2])
    offsets = _subsample_offsets(zooms)
    out = img.copy()
    labels = np.zeros(img.shape, np.int16)
    # lesion cores (reference voxels and where the profile is >= 1/4), which must stay apart; the faint
    # tails of neighbouring lesions may overlap (their gains multiply there)
    cores = np.zeros(img.shape, bool)
    # centres at least one voxel in from the cord's in-plane edge
    inner = np.stack([ndi.binary_erosion(cord[:, :, k]) for k in range(cord.shape[2])], axis=-1)
    candidates = np.argwhere(inner if inner.any() else cord)
    bb = ndi.find_objects(cord.astype(np.int8))[0]
    n_wanted = int(rng.integers(count[0], count[1] + 1))
    lesions, local_of = [], {}
    rejected = {}

    def reject(why):
        rejected[why] = rejected.get(why, 0) + 1

    tries = 0
    while len(lesions) < n_wanted and tries < max_tries * n_wanted:
        tries += 1
        c = candidates[rng.integers(len(candidates))].astype(float)
        c[:2] += rng.uniform(-0.4, 0.4, 2)
        c[2] += rng.uniform(-0.15, 0.15) if thick else rng.uniform(-0.4, 0.4)
        k = int(round(c[2]))
        if cores[tuple(np.clip(np.round(c).astype(int), 0, np.array(cord.shape) - 1))]:
            reject("centre in a lesion")
            continue
        cord_radius = np.sqrt(cord[:, :, k].sum() * zooms[0] * zooms[1] / np.pi)
        shape = _Shape(rng, thick, zooms[2])
        s_max = CORD_FRACTION * cord_radius
        # the profile reaches TAIL times the (perturbed, <= 1.35x) radius; the box holds it
        reach = TAIL * 1.4 * s_max * shape.axes[:2].max()
        z_reach = TAIL * 1.4 * (shape.half_z if thick else s_max * shape.axes[2])
        box = tuple(slice(max(b.start, int(np.floor(c[a] - r / zooms[a])) - 1),
                          min(b.stop, int(np.ceil(c[a] + r / zooms[a])) + 2))
                    for a, (b, r) in enumerate(zip(bb, (reach, reach, z_reach))))
        cbox = cord[box]
        target = float(np.exp(rng.uniform(np.log(volume_mm3[0]), np.log(volume_mm3[1]))))
        fields = _Fields(shape, c, box, offsets, zooms)

        def volume(s):
            return float(((fields.occupancy(s) >= 0.5) & cbox).sum()) * vox

        lo, hi = 0.05, s_max
        if volume(hi) <= target:
            s = hi
        else:
            for _ in range(12):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if volume(mid) <= target else (lo, mid)
            s = lo if abs(volume(lo) - target) <= abs(volume(hi) - target) else hi
        ref = (fields.occupancy(s) >= 0.5) & cbox
        prof = fields.profile(s)
        prof = np.where(cbox & (prof >= 0.02), prof, 0.0)  # clipped to the cord
        vol = float(ref.sum()) * vox
        if not (volume_mm3[0] <= vol <= volume_mm3[1]):
            reject("volume out of range")
            continue
        if metrics.label_lesions(ref)[1] != 1:
            reject("split by the cord edge")
            continue
        core = ref | (prof >= 0.25)
        if (cores[box] & ndi.binary_dilation(core, structure=metrics.CONNECTIVITY)).any():
            reject("too close to a lesion")
            continue
        # local cord intensity: median of the real cord voxels on the slices the lesion covers
        zs = np.flatnonzero(ref.any(axis=(0, 1))) + box[2].start
        zsl = slice(zs.min(), zs.max() + 1)
        local = float(np.median(img[:, :, zsl][cord[:, :, zsl]]))
        want = float(rng.uniform(*ratio))
        base = out[box][ref].astype(float)
        gain = 1.0 + (want * local * ref.sum() - base.sum()) / float((base * prof[ref]).sum())
        if local <= 0 or not (1.0 < gain <= 4.0):
            reject("gain out of range")
            continue
        trial = out[box] * (1.0 + (gain - 1.0) * prof).astype(np.float32)  # 1 outside this lesion
        lab_box = labels[box]
        if any(not (ratio[0] <= trial[lab_box == j].mean() / local_of[j] <= ratio[1])
               for j in np.unique(lab_box[(lab_box > 0) & (prof > 0)])):
            reject("would push a neighbour's ratio out of range")
            continue
        out[box] = trial
        label = len(lesions) + 1
        lab_box[ref] = label
        cores[box] |= core
        local_of[label] = local
        centre_native = np.insert(c[:2], slice_axis, c[2]) if slice_axis != 2 else c
        lesions.append(InsertedLesion(label, shape.kind, [round(float(v), 2) for v in centre_native],
                                      round(target, 2), round(vol, 2), 0.0, want, float(gain), local))
    if not lesions:
        raise RuntimeError("no lesion could be placed in this cord")
    for les in lesions:  # the ratio each lesion ends with (neighbours' tails included)
        les.ratio = float(out[labels == les.label].mean() / les.local_cord)
    return Insertion(np.moveaxis(out, -1, slice_axis), np.moveaxis(labels, -1, slice_axis), lesions,
                     n_wanted, rejected)


def float_image(data, ref: nib.Nifti1Image) -> nib.Nifti1Image:
    """`data` as float32 on `ref`'s grid with its header (affine, qform/sform and codes kept)."""
    return image_like(np.asarray(data, np.float32), ref)


# ------------------------------------------------------------------------------------------ evaluation


def predict(img, contrast, models=None, min_contrast=None):
    """Soft lesion map and lesion mask (what `cordseg lesion` writes: thresholded, faint lesions dropped) on
    the native grid, and the model's own threshold. `models` maps a contrast (or "*") to a lesion ONNX file;
    by default the shipped model (cordseg's model registry) answers. `min_contrast`: the mask's lesion
    screening (None: the model's own; 0: none)."""
    path = (models or {}).get(contrast, (models or {}).get("*"))
    _, cl = cordseg.detect_centerline(img, contrast)  # once for both maps
    prob = np.asarray(cordseg.segment_lesions(img, contrast, soft=True, model=path, centerline=cl).dataobj,
                      np.float32)
    mask = np.asarray(cordseg.segment_lesions(img, contrast, model=path, min_contrast=min_contrast,
                                              centerline=cl).dataobj) > 0
    return prob, mask, find_model("lesion", contrast, path).threshold


def score(prob, mask, ref, zooms, thresholds, default):
    """Metrics of the mask (key "mask": what the CLI writes) and lesion counts of the unscreened soft map at
    each swept threshold and the model's own (keys "0.1", ...)."""
    ref = np.asarray(ref) > 0

    def row(pred, full):
        det = metrics.lesion_detection(pred, ref)
        r = dict(n_pred=det.n_pred, n_ref=det.n_ref, tp_pred=det.tp_pred, fp=det.fp, tp_ref=det.tp_ref,
                 fn=det.fn, dice=metrics.dice(pred, ref), pred_mm3=metrics.volume_mm3(pred, zooms))
        if full:
            r.update(lesion_sensitivity=det.sensitivity, lesion_precision=det.precision,
                     voxel_sensitivity=metrics.voxel_sensitivity(pred, ref),
                     voxel_precision=metrics.voxel_precision(pred, ref))
        return r

    out = {f"{thr:g}": row(prob >= thr, False) for thr in sorted(set(thresholds) | {default})}
    out["mask"] = row(np.asarray(mask, bool), True)
    return out


def evaluate_case(img: nib.Nifti1Image, contrast, labels, thresholds=THRESHOLDS, models=None, min_contrast=None):
    """Run the lesion model on `img` and score it against `labels` (0 = no lesion). Returns (scores, per-lesion
    rows with the detection at the model's threshold and the model's peak probability inside each lesion)."""
    prob, mask, default = predict(img, contrast, models, min_contrast)
    zooms = img.header.get_zooms()[:3]
    scores = score(prob, mask, labels, zooms, thresholds, default)
    pl, _ = metrics.label_lesions(mask)
    per = []
    for k in range(1, int(labels.max()) + 1):
        m = labels == k
        if not m.any():
            continue
        # detected under the 25% rule by one predicted component
        ids, cnt = np.unique(pl[m & (pl > 0)], return_counts=True)
        per.append(dict(label=k, detected=bool((4 * cnt > m.sum()).any()), peak_prob=float(prob[m].max()),
                        mean_prob=float(prob[m].mean())))
    return scores, per, default


def _fmt(v, spec=".2f"):
    return "nan" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def _pooled(rows, key):
    tp_ref = sum(r["scores"][key]["tp_ref"] for r in rows)
    n_ref = sum(r["scores"][key]["n_ref"] for r in rows)
    tp_pred = sum(r["scores"][key]["tp_pred"] for r in rows)
    n_pred = sum(r["scores"][key]["n_pred"] for r in rows)
    sens = tp_ref / n_ref if n_ref else float("nan")
    prec = tp_pred / n_pred if n_pred else float("nan")
    f1 = 2 * sens * prec / (sens + prec) if n_pred and n_ref and (sens + prec) > 0 else 0.0
    return dict(tp_ref=tp_ref, n_ref=n_ref, tp_pred=tp_pred, n_pred=n_pred, sensitivity=sens, precision=prec,
                f1=f1)


def run(data: Path, seed=0, n=12, thresholds=THRESHOLDS, out=print, models=None, min_contrast=None):
    loaded = {}
    for path, cord_path, contrast in SCANS:
        img = nib.load(str(data / path))
        loaded[path] = (img, np.asarray(img.dataobj, np.float32),
                        np.asarray(nib.load(str(data / cord_path)).dataobj) > 0.5, contrast)

    for contrast in sorted({c for _, _, c in SCANS}):
        path = (models or {}).get(contrast, (models or {}).get("*"))
        m = find_model("lesion", contrast, path)
        screen = m.min_lesion_contrast if min_contrast is None else min_contrast
        out(f"Lesion model for {contrast}: {m.path} ({m.metadata.get('cordseg_source', '?')}; threshold "
            f"{m.threshold:g}; lesion screening " + (f"min contrast {screen:g})" if screen > 0 else "off)"))
    out("\n## Inserted lesions\n")
    out("| case | scan | seed | lesions | ref mm3 | ratio | pred | TP | FN | FP | Dice | les sens | les prec "
        "| vox sens | vox prec | peak p in lesions | s |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = []
    for i in range(n):
        path, _, _ = SCANS[i % len(SCANS)]
        img, data_arr, cord, contrast = loaded[path]
        rng = np.random.default_rng([seed, i])
        axis = metrics.axial_axis(img.affine)
        ins = insert_lesions(data_arr, cord, img.header.get_zooms()[:3], axis, rng, ratio=RATIO[contrast])
        t0 = time.perf_counter()
        scores, per, default = evaluate_case(float_image(ins.image, img), contrast, ins.labels, thresholds,
                                               models, min_contrast)
        secs = time.perf_counter() - t0
        d = scores["mask"]
        lesions = [asdict(les) | p for les, p in zip(ins.lesions, per)]
        cases.append(dict(case=i, scan=path, contrast=contrast, rng=[seed, i], lesions=lesions, scores=scores,
                          threshold=default, seconds=secs))
        vols = "/".join(f"{les.volume_mm3:.0f}" for les in ins.lesions)
        ratios = "/".join(f"{les.ratio:.2f}" for les in ins.lesions)
        peaks = "/".join(f"{p['peak_prob']:.2f}" for p in per)
        out(f"| {i} | {Path(path).name} | {seed},{i} | {d['n_ref']} | {vols} | {ratios} | {d['n_pred']} | "
            f"{d['tp_ref']} | {d['fn']} | {d['fp']} | {_fmt(d['dice'])} | {_fmt(d['lesion_sensitivity'])} | "
            f"{_fmt(d['lesion_precision'])} | {_fmt(d['voxel_sensitivity'])} | {_fmt(d['voxel_precision'])} | "
            f"{peaks} | {secs:.1f} |")

    out("\n## Lesion-free scans (unmodified)\n")
    out("| scan | pred lesions | pred mm3 | max p in cord | max p anywhere |")
    out("|---|---|---|---|---|")
    free = []
    for path, _, _ in SCANS:
        img, data_arr, cord, contrast = loaded[path]
        empty = np.zeros(data_arr.shape, np.int16)
        prob, mask, default = predict(float_image(data_arr, img), contrast, models, min_contrast)
        scores = score(prob, mask, empty, img.header.get_zooms()[:3], thresholds, default)
        d = scores["mask"]
        free.append(dict(scan=path, scores=scores, max_prob_cord=float(prob[cord].max()),
                         max_prob=float(prob.max()), threshold=default))
        out(f"| {Path(path).name} | {d['n_pred']} | {d['pred_mm3']:.1f} | {prob[cord].max():.3g} | "
            f"{prob.max():.3g} |")

    default = cases[0]["threshold"]
    key = "mask"
    dices = [c["scores"][key]["dice"] for c in cases]
    sens = [c["scores"][key]["lesion_sensitivity"] for c in cases]
    prec = [c["scores"][key]["lesion_precision"] for c in cases]
    pooled = _pooled(cases, key)
    spec = sum(f["scores"][key]["n_pred"] == 0 for f in free)
    summary = dict(threshold=default, median_dice=float(np.median(dices)),
                   dice_iqr=[float(np.percentile(dices, 25)), float(np.percentile(dices, 75))],
                   median_lesion_sensitivity=float(np.nanmedian(sens)),
                   median_lesion_precision=float(np.nanmedian(prec)) if not np.all(np.isnan(prec)) else float("nan"),
                   pooled=pooled, lesion_free_specificity=spec / len(free),
                   lesion_free_false_lesions=sum(f["scores"][key]["n_pred"] for f in free))
    out(f"\nSummary (threshold {default:g}, {n} cases, seed {seed}): median Dice {summary['median_dice']:.3f} "
        f"(IQR {summary['dice_iqr'][0]:.3f}-{summary['dice_iqr'][1]:.3f}), median lesion-wise sensitivity "
        f"{summary['median_lesion_sensitivity']:.3f}, median precision "
        f"{_fmt(summary['median_lesion_precision'], '.3f')}; "
        f"pooled lesion-wise sensitivity {pooled['tp_ref']}/{pooled['n_ref']} = {_fmt(pooled['sensitivity'], '.3f')}, "
        f"precision {pooled['tp_pred']}/{pooled['n_pred']} = {_fmt(pooled['precision'], '.3f')}; "
        f"lesion-free scans: volume-wise specificity {spec}/{len(free)}, "
        f"{summary['lesion_free_false_lesions']} false lesions")

    # per-lesion breakdown: where does detection fail?
    all_les = [dict(les, scan=Path(c["scan"]).name) for c in cases for les in c["lesions"]]
    out("\n## Detection by scan, volume and ratio (threshold %g)\n" % default)
    out("| group | detected / lesions | median peak p |")
    out("|---|---|---|")
    groups = [(f"scan {s}", lambda x, s=s: x["scan"] == s) for s in sorted({x["scan"] for x in all_les})]
    groups += [(f"{lo:g}-{hi:g} mm3", lambda x, lo=lo, hi=hi: lo <= x["volume_mm3"] < hi)
               for lo, hi in ((0, 20), (20, 80), (80, 501))]
    groups += [(f"ratio {lo:g}-{hi:g}", lambda x, lo=lo, hi=hi: lo <= x["ratio"] < hi)
               for lo, hi in ((1.0, 1.5), (1.5, 1.75), (1.75, 2.01))]
    groups += [(f"shape {k}", lambda x, k=k: x["shape"] == k) for k in ("ellipsoid", "harmonic")]
    breakdown = {}
    for name, sel in groups:
        g = [x for x in all_les if sel(x)]
        if not g:
            continue
        det = sum(x["detected"] for x in g)
        med = float(np.median([x["peak_prob"] for x in g]))
        breakdown[name] = dict(detected=det, lesions=len(g), median_peak_prob=med)
        out(f"| {name} | {det}/{len(g)} | {med:.2f} |")

    out("\n## Threshold sweep (unscreened soft map thresholded; report only, the shipped threshold is "
        "unchanged; the last row is the screened mask)\n")
    out("| threshold | pooled sens | pooled prec | pooled F1 | median Dice | false lesions on lesion-free scans |")
    out("|---|---|---|---|---|---|")
    sweep = []
    for thr in [*sorted(set(thresholds) | {default}), "mask"]:
        k = thr if thr == "mask" else f"{thr:g}"
        pl = _pooled(cases, k)
        fl = sum(f["scores"][k]["n_pred"] for f in free)
        md = float(np.median([c["scores"][k]["dice"] for c in cases]))
        if thr != "mask":
            sweep.append(dict(threshold=thr, **pl, median_dice=md, lesion_free_false_lesions=fl))
        name = f"{default:g}, screened" if thr == "mask" else f"{thr:g}"
        out(f"| {name} | {pl['tp_ref']}/{pl['n_ref']} = {_fmt(pl['sensitivity'], '.3f')} | "
            f"{pl['tp_pred']}/{pl['n_pred']} = {_fmt(pl['precision'], '.3f')} | {pl['f1']:.3f} | {md:.3f} | {fl} |")
    best = max(sweep, key=lambda r: (r["f1"], -abs(r["threshold"] - default)))
    own = [r for r in sweep if r["threshold"] == default][0]["f1"]
    if best["f1"] > 0:
        out(f"\nBest pooled F1 {best['f1']:.3f} at threshold {best['threshold']:g} "
            f"(the model's own threshold {default:g}: F1 {own:.3f})")
    else:
        out(f"\nNo threshold from {min(thresholds):g} to {max(thresholds):g} detects any inserted lesion (F1 0).")

    ms_path, ms_contrast = MS_SCAN
    ms = dict(scan=ms_path)
    if (data / ms_path).exists():
        prob, mask, thr0 = predict(str(data / ms_path), ms_contrast, models, min_contrast)
        ref_img = nib.load(str(data / ms_path))
        ms_rows = []
        for thr in sorted(set(thresholds) | {thr0}):
            pred = mask if thr == thr0 else prob >= thr
            tab = cordseg.lesion_table(float_image(pred.astype(np.float32), ref_img))
            ms_rows.append(dict(threshold=thr, lesions=len(tab), total_mm3=sum(r.volume_mm3 for r in tab),
                                volumes_mm3=[round(r.volume_mm3, 1) for r in tab]))
        ms.update(max_prob=float(prob.max()), by_threshold=ms_rows)
        at = [r for r in ms_rows if r["threshold"] == thr0][0]
        out(f"\n## Real MS scan {ms_path}\n")
        who = "cordseg" if not models else "model under test"
        out(f"{who} (threshold {thr0:g}): {at['lesions']} lesions, {at['total_mm3']:.0f} mm3 in all; "
            f"max probability {prob.max():.3g}. Published model (FACTS.md): {PUBLISHED_MS}.")
        out("By threshold: " + "; ".join(f"{r['threshold']:g}: {r['lesions']} ({r['total_mm3']:.0f} mm3)"
                                         for r in ms_rows))
    cmd = "python bench/lesions.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("lesions.py") else \
        f"python bench/lesions.py --seed {seed} --n {n}"
    out(f"\nCommand: {cmd}")
    return dict(command=cmd, seed=seed, n=n, models=models or "shipped", cases=cases, lesion_free=free,
                summary=summary, breakdown=breakdown, threshold_sweep=sweep, best_threshold=best, ms_scan=ms)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=12, help="inserted-lesion cases in all, spread over the scans")
    p.add_argument("--data", type=Path, default=default_data())
    p.add_argument("--json", type=Path)
    p.add_argument("--model", action="append", default=[], metavar="[CONTRAST=]ONNX",
                   help="evaluate this lesion model instead of the shipped one (e.g. t2=published_t2.onnx "
                        "t2s=published_t2s.onnx, converted with cordseg import-keras); repeatable")
    p.add_argument("--min-contrast", type=float, help="lesion screening of the scored masks (default: each "
                   "model's own, 1.1 for the shipped one and none for imported ones; 0: unscreened)")
    a = p.parse_args(argv)
    models = dict(m.split("=", 1) if "=" in m else ("*", m) for m in a.model) or None
    warnings.simplefilter("ignore")
    result = run(a.data, a.seed, a.n, models=models, min_contrast=a.min_contrast)
    if a.json:
        a.json.write_text(json.dumps(_strict(result), indent=1, allow_nan=False))


def _strict(obj):
    """JSON-safe copy: NumPy scalars as Python numbers, nan as null."""
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


if __name__ == "__main__":
    main()
