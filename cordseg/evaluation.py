"""Evaluate predictions against references, file by file: the engine of `cordseg evaluate`.

Rules (documented here because users see their effects):
- Kinds: "sc" (cord mask vs cord mask), "lesion" (lesion mask vs lesion mask: voxel metrics plus
  lesion-wise detection, see cordseg.metrics), "centerline" (a centerline vs a cord mask or a
  reference centerline).
- Grids: metrics are computed on the reference grid. A prediction on another grid of the same
  physical space is resampled onto it by nearest neighbour (voxel-to-voxel affine,
  scipy.ndimage.affine_transform) and the row's notes say "resampled prediction onto reference
  grid"; prediction voxels outside the reference field of view are counted in a note. Pairs
  whose fields of view do not overlap are refused with an InputError.
- Centerlines: PRED is a NIfTI centerline mask (one voxel per slice, as `cordseg centerline`
  writes; several voxels on a slice are averaged) or a CSV of points. REF is a cord mask, a
  centerline mask or a centerline CSV. A REF whose non-empty slices hold one voxel each (median)
  is taken as a centerline: distances are computed, the localization rate is not (None).
  On another grid, the prediction's per-slice points are mapped through the affines onto the
  reference slices (averaged when several fall on one slice, linearly interpolated between
  points of adjacent prediction slices when the reference slices are finer).
- Centerline CSV: one point per row, voxel coordinates x,y,z (floats allowed) in the cordseg
  working space ("RPI": nibabel axis codes L,A,S) of the *other* file of the pair, which must
  be a NIfTI image -- the format of the OptiC CSVs in the shared test data. Either no header
  and exactly three columns x,y,z, or a header row naming columns x, y and z (other columns,
  e.g. "slice", are ignored).
- Pair discovery from folders (`discover_pairs`): with two different folders, a prediction
  PRED_DIR/<stem>.<ext> pairs with REF_DIR/<stem>.<ext'> or REF_DIR/<stem>-manual.<ext'>;
  with one folder, each reference <base>-manual.<ext> pairs with the prediction <base>.<ext>
  in the same folder (e.g. t2_seg.nii.gz <-> t2_seg-manual.nii.gz). <ext> is .nii.gz, .nii
  or (centerline predictions) .csv.
- Undefined values (e.g. sensitivity with an empty reference) are None in the rows, so they
  are valid JSON; summaries skip them.
- Volume-wise specificity (lesion kind): over the pairs whose reference holds no lesion,
  the share whose prediction holds none either; reported in the summary.
"""
from __future__ import annotations

import csv
import math
import os
from itertools import product
from pathlib import Path
from typing import Iterable, Optional, Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import inv_ornt_aff
from scipy import ndimage

from . import metrics as m
from .errors import InputError
from .io import img_name, load_image, nifti_stem, same_grid
from .orientation import rpi_transform

__all__ = [
    "KINDS",
    "METRIC_KEYS",
    "evaluate_pair",
    "evaluate_pairs",
    "summarize",
    "format_table",
    "discover_pairs",
    "read_centerline_csv",
]

KINDS = ("sc", "lesion", "centerline")

# Scalar metrics of each kind, in table order.
METRIC_KEYS = {
    "sc": ["dice", "rvd", "sensitivity", "precision", "volume_pred_mm3", "volume_ref_mm3"],
    "lesion": [
        "dice", "rvd", "sensitivity", "precision",
        "lesion_sensitivity", "lesion_precision", "n_lesions_pred", "n_lesions_ref",
        "lesion_tp_pred", "lesion_fp", "lesion_tp_ref", "lesion_fn",
        "volume_pred_mm3", "volume_ref_mm3",
    ],
    "centerline": [
        "centerline_mse_mm2", "centerline_max_mm", "localization_rate",
        "n_slices_ref", "n_slices_pred", "n_slices_compared", "n_slices_missing", "n_slices_extra",
    ],
}
RESAMPLED_NOTE = "resampled prediction onto reference grid"
_IMAGE_EXTS = (".nii.gz", ".nii")


# --------------------------------------------------------------------------- small helpers


def _is_csv(src) -> bool:
    return isinstance(src, (str, os.PathLike)) and str(src).lower().endswith(".csv")


def _name(src) -> str:
    return img_name(src, "<in-memory image>")


def _stem(path) -> str:
    name = Path(path).name
    if name.lower().endswith(".csv") and len(name) > 4:
        return name[:-4]
    return nifti_stem(name)


def _clean(v):
    """JSON-safe scalar: nan -> None, numpy scalars -> Python."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return None if math.isnan(v) else v
    return v


def _load(src) -> nib.Nifti1Image:
    if _is_csv(src):
        raise InputError(f"{src}: a CSV can only be a centerline (use --kind centerline).")
    return load_image(src)


def _data(img) -> np.ndarray:
    return np.asanyarray(img.dataobj)


def _zooms(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def _apply(mat, pts) -> np.ndarray:
    pts = np.atleast_2d(np.asarray(pts, float))
    return pts @ mat[:3, :3].T + mat[:3, 3]


def _extent(shape) -> np.ndarray:
    """The 8 outer corners of a voxel grid (voxel centres at 0..n-1, edges at +-0.5)."""
    return np.array(list(product(*[(-0.5, n - 0.5) for n in shape])), float)


def _fov_overlap(a_aff, a_shape, b_aff, b_shape) -> bool:
    """True when the two grids' boxes intersect (tested in each grid's voxel frame)."""
    for s_aff, s_shape, d_aff, d_shape in ((a_aff, a_shape, b_aff, b_shape), (b_aff, b_shape, a_aff, a_shape)):
        q = _apply(np.linalg.inv(d_aff) @ s_aff, _extent(s_shape))
        lo, hi = q.min(axis=0), q.max(axis=0)
        if np.any(hi <= -0.5) or np.any(lo >= np.asarray(d_shape) - 0.5):
            return False
    return True


def _world_box(aff, shape) -> str:
    w = _apply(aff, _extent(shape))
    lo, hi = w.min(axis=0), w.max(axis=0)
    return "[" + ", ".join(f"{a:.1f}..{b:.1f}" for a, b in zip(lo, hi)) + "] mm"


def _check_overlap(pred_name, p_aff, p_shape, ref_name, r_aff, r_shape) -> None:
    if not _fov_overlap(p_aff, p_shape, r_aff, r_shape):
        raise InputError(
            f"{pred_name} and {ref_name}: fields of view do not overlap "
            f"(prediction {_world_box(p_aff, p_shape)}, reference {_world_box(r_aff, r_shape)} "
            "in scanner x,y,z); they cannot come from the same scan."
        )


def _resample_nearest(mask: np.ndarray, src_aff, dst_aff, dst_shape) -> np.ndarray:
    """Nearest-neighbour resampling of a boolean mask onto another grid of the same space.

    mode 'grid-constant' keeps the half-voxel border of the source grid (a reference voxel
    whose centre falls within half a voxel outside the source's outer voxel centres still
    takes that voxel's value) and fills beyond it with 0.
    """
    vox = np.linalg.inv(src_aff) @ dst_aff  # reference voxel -> prediction voxel
    out = ndimage.affine_transform(
        mask.astype(np.uint8), vox[:3, :3], offset=vox[:3, 3], output_shape=tuple(dst_shape),
        order=0, mode="grid-constant", cval=0,
    )
    return out > 0


def _outside_count(mask: np.ndarray, src_aff, dst_aff, dst_shape) -> int:
    """Foreground voxels of ``mask`` whose centres fall outside the destination grid."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return 0
    q = _apply(np.linalg.inv(dst_aff) @ src_aff, idx)
    out = np.any((q < -0.5) | (q >= np.asarray(dst_shape) - 0.5), axis=1)
    return int(out.sum())


def _pred_on_ref_grid(pred, ref, notes) -> tuple:
    """Load both masks, put the prediction on the reference grid. Returns (p, r, ref_img)."""
    pred_img, ref_img = _load(pred), _load(ref)
    p, r = m.binary(_data(pred_img)), m.binary(_data(ref_img))
    if not same_grid(pred_img.affine, p.shape, ref_img.affine, r.shape):
        _check_overlap(_name(pred), pred_img.affine, p.shape, _name(ref), ref_img.affine, r.shape)
        lost = _outside_count(p, pred_img.affine, ref_img.affine, r.shape)
        p = _resample_nearest(p, pred_img.affine, ref_img.affine, r.shape)
        notes.append(RESAMPLED_NOTE)
        if lost:
            notes.append(f"{lost} predicted voxels lie outside the reference field of view and were ignored")
    return p, r, ref_img


# --------------------------------------------------------------------------- centerline input


def read_centerline_csv(path) -> np.ndarray:
    """Points (n, 3) of a centerline CSV: x,y,z voxel coordinates in working space (RPI)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found.")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a centerline CSV ({exc}).") from exc
    if not rows:
        raise InputError(f"{path}: the centerline CSV holds no point.")
    cols = [0, 1, 2]
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header = [c.strip().lower() for c in rows[0]]
        if not {"x", "y", "z"} <= set(header):
            raise InputError(f"{path}: the CSV header must name columns x, y and z (found {', '.join(header)}).")
        cols = [header.index(k) for k in ("x", "y", "z")]
        rows = rows[1:]
    else:
        if len(rows[0]) != 3:
            raise InputError(
                f"{path}: a centerline CSV without header must have 3 columns x,y,z (found {len(rows[0])})."
            )
    try:
        pts = np.array([[float(r[c]) for c in cols] for r in rows], float).reshape(-1, 3)
    except (ValueError, IndexError) as exc:
        raise InputError(f"{path}: malformed row in the centerline CSV ({exc}).") from exc
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{path}: the centerline CSV holds non-finite coordinates.")
    return pts


def _rpi_to_native(points: np.ndarray, affine, shape) -> np.ndarray:
    """Working-space (L,A,S axis codes) voxel coordinates -> the image's native voxel coordinates."""
    return _apply(inv_ornt_aff(rpi_transform(affine), shape), points)


def _points_to_grid(src_pts: dict, src_aff, dst_aff, dst_axis) -> dict:
    """Per-slice centerline points of one grid -> {slice: voxel 3-vector} on another grid."""
    if not src_pts:
        return {}
    order = sorted(src_pts)
    q = _apply(np.linalg.inv(dst_aff) @ src_aff, np.array([src_pts[s] for s in order]))
    groups: dict = {}
    for p in q:
        groups.setdefault(int(np.floor(p[dst_axis] + 0.5)), []).append(p)
    out = {}
    for s, pts in groups.items():
        c = np.mean(pts, axis=0)
        c[dst_axis] = float(s)
        out[s] = c
    # Fill reference slices that fall between points of adjacent prediction slices.
    for i in range(len(order) - 1):
        if order[i + 1] - order[i] != 1:
            continue
        a, b = q[i], q[i + 1]
        za, zb = a[dst_axis], b[dst_axis]
        if za == zb:
            continue
        for s in range(int(np.ceil(min(za, zb))), int(np.floor(max(za, zb))) + 1):
            if s not in out:
                c = a + (s - za) / (zb - za) * (b - a)
                c[dst_axis] = float(s)
                out[s] = c
    return out


def _looks_like_centerline(mask: np.ndarray, axis: int) -> bool:
    counts = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).sum(axis=1)
    counts = counts[counts > 0]
    return counts.size > 0 and float(np.median(counts)) <= 1.0


def _centerline_pair(pred, ref, notes):
    """Returns (CenterlineErrors) for a centerline prediction vs a reference."""
    if _is_csv(pred) and _is_csv(ref):
        raise InputError(
            f"{_name(pred)} and {_name(ref)}: two CSVs carry no voxel geometry; give at least one NIfTI image."
        )
    if _is_csv(ref):
        grid = _load(pred)
        shape, aff = _data(grid).shape, grid.affine
        ref_pts = np.floor(_rpi_to_native(read_centerline_csv(ref), aff, shape) + 0.5).astype(int)
        inside = np.all((ref_pts >= 0) & (ref_pts < np.asarray(shape)), axis=1)
        if not inside.all():
            notes.append(f"{int((~inside).sum())} reference CSV points lie outside the prediction's grid")
        r = np.zeros(shape, bool)
        r[tuple(ref_pts[inside].T)] = True
        notes.append("reference centerline CSV read on the prediction's grid")
        return m.centerline_errors(m.binary(_data(grid)), r, affine=aff, ref_is_mask=False)

    ref_img = _load(ref)
    r = m.binary(_data(ref_img))
    aff = ref_img.affine
    axis = m.axial_axis(aff)
    ref_is_mask = not _looks_like_centerline(r, axis)
    if not ref_is_mask:
        notes.append("reference is a centerline: localization rate not defined")
    if _is_csv(pred):
        pts = _rpi_to_native(read_centerline_csv(pred), aff, r.shape)
        return m.centerline_errors(pts, r, affine=aff, axis=axis, ref_is_mask=ref_is_mask)
    pred_img = _load(pred)
    p = m.binary(_data(pred_img))
    if same_grid(pred_img.affine, p.shape, aff, r.shape):
        return m.centerline_errors(p, r, affine=aff, axis=axis, ref_is_mask=ref_is_mask)
    _check_overlap(_name(pred), pred_img.affine, p.shape, _name(ref), aff, r.shape)
    src = m.slice_centers(p, m.axial_axis(pred_img.affine))
    pts = _points_to_grid(src, pred_img.affine, aff, axis)
    notes.append("mapped prediction centerline points onto reference grid")
    return m.centerline_errors(pts, r, affine=aff, axis=axis, ref_is_mask=ref_is_mask)


# --------------------------------------------------------------------------- public API


def evaluate_pair(pred, ref, kind: str = "sc") -> dict:
    """Metrics of one prediction against one reference (paths or nibabel images).

    Returns a JSON-serialisable dict: "pred", "ref", "kind", the kind's metrics
    (METRIC_KEYS[kind]; None where undefined), lesion kind also the per-lesion volume
    lists "lesion_volumes_pred_mm3"/"lesion_volumes_ref_mm3", and "notes" (list of str).
    """
    if kind not in KINDS:
        raise InputError(f"unknown evaluation kind {kind!r}: choose sc, lesion or centerline.")
    notes: list = []
    row: dict = {"pred": _name(pred), "ref": _name(ref), "kind": kind}
    if kind == "centerline":
        e = _centerline_pair(pred, ref, notes)
        row.update(
            centerline_mse_mm2=e.mse_mm2,
            centerline_max_mm=e.max_distance_mm,
            localization_rate=e.localization_rate,
            n_slices_ref=e.n_slices_ref,
            n_slices_pred=e.n_slices_pred,
            n_slices_compared=e.n_slices_compared,
            n_slices_missing=e.n_slices_missing,
            n_slices_extra=e.n_slices_extra,
        )
    else:
        p, r, ref_img = _pred_on_ref_grid(pred, ref, notes)
        zooms = _zooms(ref_img.affine)
        row.update(
            dice=m.dice(p, r),
            rvd=m.relative_volume_difference(p, r),
            sensitivity=m.voxel_sensitivity(p, r),
            precision=m.voxel_precision(p, r),
        )
        if kind == "lesion":
            det = m.lesion_detection(p, r)
            row.update(
                lesion_sensitivity=det.sensitivity,
                lesion_precision=det.precision,
                n_lesions_pred=det.n_pred,
                n_lesions_ref=det.n_ref,
                lesion_tp_pred=det.tp_pred,
                lesion_fp=det.fp,
                lesion_tp_ref=det.tp_ref,
                lesion_fn=det.fn,
            )
        row.update(volume_pred_mm3=m.volume_mm3(p, zooms), volume_ref_mm3=m.volume_mm3(r, zooms))
        if kind == "lesion":
            row["lesion_volumes_pred_mm3"] = m.lesion_volumes(p, zooms)
            row["lesion_volumes_ref_mm3"] = m.lesion_volumes(r, zooms)
    row["notes"] = notes
    return {k: ([_clean(x) for x in v] if k.startswith("lesion_volumes") else _clean(v)) for k, v in row.items()}


def summarize(rows: Sequence[dict], kind: Optional[str] = None) -> dict:
    """Median and interquartile range (25th/75th percentiles) of each metric over the rows.

    Returns {"kind", "n_pairs", "metrics": {key: {"median", "q25", "q75", "n"}}} where n counts
    the rows where the metric is defined; for the lesion kind also "volume_specificity" and
    "n_lesion_free" (pairs whose reference holds no lesion) when there is at least one.
    """
    kind = kind or (rows[0]["kind"] if rows else "sc")
    stats = {}
    for key in METRIC_KEYS[kind]:
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            q25, med, q75 = np.percentile(np.asarray(vals, float), [25, 50, 75])
            stats[key] = {"median": float(med), "q25": float(q25), "q75": float(q75), "n": len(vals)}
        else:
            stats[key] = {"median": None, "q25": None, "q75": None, "n": 0}
    out = {"kind": kind, "n_pairs": len(rows), "metrics": stats}
    if kind == "lesion":
        free = [r for r in rows if r.get("n_lesions_ref") == 0]
        if free:
            out["n_lesion_free"] = len(free)
            out["volume_specificity"] = sum(r["n_lesions_pred"] == 0 for r in free) / len(free)
    return out


def evaluate_pairs(pairs: Iterable, kind: str = "sc") -> tuple:
    """Evaluate several (pred, ref) pairs. Returns (rows, summary) -- see summarize()."""
    rows = []
    for pred, ref in pairs:
        try:
            rows.append(evaluate_pair(pred, ref, kind))
        except InputError as exc:
            msg = str(exc)
            if _name(pred) in msg and _name(ref) in msg:
                raise
            raise type(exc)(f"pair {_name(pred)} / {_name(ref)}: {msg}") from exc
    if not rows:
        raise InputError("no prediction/reference pair to evaluate.")
    return rows, summarize(rows, kind)


def discover_pairs(pred_dir, ref_dir=None) -> tuple:
    """Match predictions to references in folders (rules in the module docstring).

    Returns (pairs, unmatched): pairs is a sorted list of (pred_path, ref_path); unmatched
    lists the predictions without a reference (two folders) or the references without a
    prediction (one folder). InputError when no pair is found.
    """
    pred_dir = Path(pred_dir)
    ref_dir = Path(ref_dir) if ref_dir is not None else pred_dir
    for d in (pred_dir, ref_dir):
        if not d.is_dir():
            raise InputError(f"{d}: not a folder.")

    def files(d):
        return sorted(
            f for f in d.iterdir()
            if f.is_file() and any(f.name.lower().endswith(e) for e in _IMAGE_EXTS + (".csv",))
        )

    by_stem: dict = {}
    for f in files(ref_dir):
        by_stem.setdefault(_stem(f), f)
    pairs, unmatched = [], []
    if pred_dir.resolve() == ref_dir.resolve():
        preds = {}
        for f in files(pred_dir):
            preds.setdefault(_stem(f), f)
        for stem, ref in sorted(by_stem.items()):
            if not stem.endswith("-manual") or stem == "-manual":
                continue
            pred = preds.get(stem[: -len("-manual")])
            (pairs.append((pred, ref)) if pred is not None else unmatched.append(ref))
        rule = "references named <base>-manual.nii.gz beside predictions named <base>.nii.gz"
    else:
        for pred in files(pred_dir):
            stem = _stem(pred)
            ref = by_stem.get(stem) or by_stem.get(stem + "-manual")
            (pairs.append((pred, ref)) if ref is not None else unmatched.append(pred))
        rule = f"files of {ref_dir} with the same name (or <name>-manual) as those of {pred_dir}"
    if not pairs:
        raise InputError(f"no prediction/reference pair found: expected {rule}.")
    return pairs, unmatched


# --------------------------------------------------------------------------- text table


_COUNT_KEYS = {"lesion_tp_pred", "lesion_fp", "lesion_tp_ref", "lesion_fn"}


def _fmt(v, key: str = "") -> str:
    if isinstance(v, float) and (key.startswith("n_") or key in _COUNT_KEYS):
        return f"{v:g}"  # a median of counts: 55, 27.5
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)


def _grid_text(header: list, body: list) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in body])


def format_table(rows: Sequence[dict], summary: Optional[dict] = None) -> str:
    """Readable text: one pair as a metric/value list, several as one row per pair plus
    median, q25 and q75 rows (and volume-wise specificity for lesion-free references)."""
    if not rows:
        return "(no pair)"
    kind = rows[0]["kind"]
    keys = METRIC_KEYS[kind]
    lines = []
    if len(rows) == 1 and summary is None:
        r = rows[0]
        lines += [f"prediction: {r['pred']}", f"reference:  {r['ref']}", f"kind:       {kind}", ""]
        lines.append(_grid_text(["metric", "value"], [[k, _fmt(r.get(k), k)] for k in keys]))
        lines += [f"note: {n}" for n in r.get("notes", [])]
        return "\n".join(lines)

    summary = summary or summarize(rows, kind)
    body = [[Path(r["pred"]).name] + [_fmt(r.get(k), k) for k in keys] for r in rows]
    for stat in ("median", "q25", "q75"):
        body.append([stat] + [_fmt(summary["metrics"][k][stat], k) for k in keys])
    lines.append(f"kind: {kind}, {len(rows)} pairs")
    lines.append(_grid_text(["prediction"] + keys, body))
    if "volume_specificity" in summary:
        lines.append(
            f"volume-wise specificity: {_fmt(summary['volume_specificity'])} "
            f"over {summary['n_lesion_free']} lesion-free references"
        )
    for r in rows:
        lines += [f"note ({Path(r['pred']).name}): {n}" for n in r.get("notes", [])]
    return "\n".join(lines)
