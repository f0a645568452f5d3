"""Segmentation and centerline metrics of Gros et al. (2019), on plain arrays.

Everything here works on NumPy arrays and voxel sizes (or an affine), with no file I/O,
so the same functions serve the CLI, the benchmarks and the tests.

Conventions (chosen here, used everywhere in cordseg):
- A mask voxel is foreground when its value is > 0.5 (binary masks and probability maps alike).
- Ratios whose denominator is zero are undefined and return ``nan`` -- except Dice, which is
  1.0 when both masks are empty (two empty masks agree perfectly; this is what a lesion-free
  scan with no predicted lesion should score).
- Lesions are 3D connected components with 26-connectivity (voxels that share a face, an
  edge or a corner belong to one lesion), so a lesion drawn on thick slices whose in-plane
  outline shifts diagonally from slice to slice stays one lesion.
- Lesion-wise detection (paper, section 2.4.3) -- a predicted lesion P and a manual lesion R
  *match* when P covers more than 25% of R's voxels: ``4 * |P & R| > |R|`` (integer test, so
  exactly 25% is not a match). Then
    * a predicted lesion is a true positive when it matches at least one manual lesion,
      otherwise a false positive;
    * a manual lesion is detected (true positive) when at least one predicted lesion matches
      it, otherwise it is a false negative ("covered 25% or less").
  Coverage is judged per predicted lesion, never pooled: a manual lesion split into two
  predicted pieces of 20% each is missed and both pieces are false positives; split into
  two pieces of 30% each it is detected and both pieces are true positives.
  lesion sensitivity = detected manual lesions / manual lesions;
  lesion precision   = true-positive predicted lesions / predicted lesions.
- "Axial" slices are taken along the voxel axis closest to the scanner's inferior-superior
  axis (``nibabel.orientations.aff2axcodes``), so any stored orientation works; with only
  zooms given, axis 2 is the slice axis (cordseg's working space).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from nibabel.orientations import aff2axcodes
from scipy import ndimage

__all__ = [
    "binary",
    "dice",
    "relative_volume_difference",
    "voxel_sensitivity",
    "voxel_precision",
    "volume_mm3",
    "label_lesions",
    "lesion_volumes",
    "LesionDetection",
    "lesion_detection",
    "lesion_sensitivity",
    "lesion_precision",
    "volume_specificity",
    "axial_axis",
    "slice_centers",
    "CenterlineErrors",
    "centerline_errors",
    "centerline_mse",
    "localization_rate",
]

# 26-connectivity: the full 3x3x3 neighbourhood.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# A predicted lesion matches a manual one when it covers strictly more than this share of it.
LESION_OVERLAP = 0.25

ArrayLike = Union[np.ndarray, Sequence]


def binary(mask: ArrayLike) -> np.ndarray:
    """Boolean foreground of a mask or probability map (value > 0.5)."""
    return np.asarray(mask) > 0.5


def _pair(pred: ArrayLike, ref: ArrayLike):
    p, r = binary(pred), binary(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    return p, r


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def dice(pred: ArrayLike, ref: ArrayLike) -> float:
    """Dice coefficient 2|P&R| / (|P|+|R|); 1.0 when both masks are empty."""
    p, r = _pair(pred, ref)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & r)) / total


def relative_volume_difference(pred: ArrayLike, ref: ArrayLike) -> float:
    """(V_pred - V_ref) / V_ref (voxel sizes cancel); nan when the reference is empty."""
    p, r = _pair(pred, ref)
    return _ratio(int(p.sum()) - int(r.sum()), int(r.sum()))


def voxel_sensitivity(pred: ArrayLike, ref: ArrayLike) -> float:
    """Voxel-wise true positive rate |P&R| / |R|; nan when the reference is empty."""
    p, r = _pair(pred, ref)
    return _ratio(np.count_nonzero(p & r), r.sum())


def voxel_precision(pred: ArrayLike, ref: ArrayLike) -> float:
    """Voxel-wise positive predictive value |P&R| / |P|; nan when the prediction is empty."""
    p, r = _pair(pred, ref)
    return _ratio(np.count_nonzero(p & r), p.sum())


def volume_mm3(mask: ArrayLike, zooms: Sequence[float]) -> float:
    """Foreground volume in mm^3 for voxel sizes ``zooms`` (mm)."""
    return float(np.count_nonzero(binary(mask))) * float(np.prod(np.asarray(zooms, float)))


def label_lesions(mask: ArrayLike):
    """3D connected components (26-connectivity). Returns (labels int32 array, count)."""
    m = binary(mask)
    if m.ndim != 3:
        raise ValueError(f"lesion masks must be 3D, got {m.ndim}D")
    labels, n = ndimage.label(m, structure=CONNECTIVITY)
    return labels.astype(np.int32, copy=False), int(n)


def lesion_volumes(mask: ArrayLike, zooms: Sequence[float]) -> list:
    """Volume in mm^3 of each lesion (component), in label order."""
    labels, n = label_lesions(mask)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    vox = float(np.prod(np.asarray(zooms, float)))
    return [float(c) * vox for c in counts]


@dataclass
class LesionDetection:
    """Lesion-wise counts under the 25% matching rule (see the module docstring)."""

    n_pred: int
    n_ref: int
    tp_pred: int  # predicted lesions that match a manual lesion
    fp: int  # predicted lesions that match none
    tp_ref: int  # manual lesions matched by some predicted lesion (detected)
    fn: int  # manual lesions no predicted lesion matches

    @property
    def sensitivity(self) -> float:
        """Detected manual lesions / manual lesions; nan when there are none."""
        return _ratio(self.tp_ref, self.n_ref)

    @property
    def precision(self) -> float:
        """True-positive predicted lesions / predicted lesions; nan when there are none."""
        return _ratio(self.tp_pred, self.n_pred)


def lesion_detection(pred: ArrayLike, ref: ArrayLike) -> LesionDetection:
    """Match predicted and manual lesions (3D components) by the paper's 25% rule."""
    p, r = _pair(pred, ref)
    pl, n_pred = label_lesions(p)
    rl, n_ref = label_lesions(r)
    ref_size = np.bincount(rl.ravel(), minlength=n_ref + 1)
    both = (pl > 0) & (rl > 0)
    # overlap[i, j] = voxels shared by predicted lesion i and manual lesion j (1-based).
    overlap = np.zeros((n_pred + 1, n_ref + 1), dtype=np.int64)
    np.add.at(overlap, (pl[both], rl[both]), 1)
    match = 4 * overlap[1:, 1:] > ref_size[None, 1:]  # > 25%, in integers
    tp_pred = int(match.any(axis=1).sum())
    tp_ref = int(match.any(axis=0).sum())
    return LesionDetection(n_pred, n_ref, tp_pred, n_pred - tp_pred, tp_ref, n_ref - tp_ref)


def lesion_sensitivity(pred: ArrayLike, ref: ArrayLike) -> float:
    """Lesion-wise true positive rate (25% rule); nan when the reference has no lesion."""
    return lesion_detection(pred, ref).sensitivity


def lesion_precision(pred: ArrayLike, ref: ArrayLike) -> float:
    """Lesion-wise positive predictive value (25% rule); nan when nothing is predicted."""
    return lesion_detection(pred, ref).precision


def volume_specificity(preds: Iterable[ArrayLike]) -> float:
    """Share of lesion-free scans on which nothing is predicted (no foreground voxel).

    ``preds`` are the predicted lesion masks of scans known to hold no lesion.
    nan for an empty collection.
    """
    flags = [not binary(p).any() for p in preds]
    return _ratio(sum(flags), len(flags))


# ----------------------------------------------------------------------------- centerline


def axial_axis(affine: np.ndarray) -> int:
    """Index of the voxel axis closest to the scanner's inferior-superior axis."""
    codes = aff2axcodes(np.asarray(affine, float))
    for i, c in enumerate(codes):
        if c in ("S", "I"):
            return i
    raise ValueError(f"cannot tell the slice axis from orientation {codes}")


def _grid(shape_ndim: int, affine, zooms, axis):
    """Resolve (affine, slice axis) from an affine or from zooms (axis 2 by default)."""
    if affine is None and zooms is None:
        raise ValueError("give the voxel geometry as affine= or zooms=")
    if affine is None:
        z = np.asarray(zooms, float)
        if z.shape != (shape_ndim,):
            raise ValueError(f"zooms must have {shape_ndim} values, got {z.tolist()}")
        affine = np.diag(np.r_[z, 1.0])
        if axis is None:
            axis = 2
    affine = np.asarray(affine, float)
    if axis is None:
        axis = axial_axis(affine)
    return affine, int(axis)


def slice_centers(mask: ArrayLike, axis: int = 2) -> dict:
    """Centre of mass, in voxel coordinates (3-vector), of the foreground of each slice.

    Keys are the slice indices along ``axis`` that hold foreground; the slice coordinate
    of each centre is the slice index itself.
    """
    m = binary(mask)
    centers = {}
    moved = np.moveaxis(m, axis, 0)
    for s in np.flatnonzero(moved.reshape(moved.shape[0], -1).any(axis=1)):
        idx = np.argwhere(moved[s]).mean(axis=0)
        c = np.insert(idx, axis, float(s))
        centers[int(s)] = c
    return centers


@dataclass
class CenterlineErrors:
    """Per-slice comparison of a centerline with a reference mask (see centerline_errors)."""

    squared_mm2: dict  # slice -> squared in-plane distance (mm^2), compared slices only
    n_slices_ref: int  # slices where the reference has foreground
    n_slices_pred: int  # slices where the prediction has a centerline point
    n_slices_compared: int  # slices with both
    n_slices_missing: int  # reference slices without a predicted point
    n_slices_extra: int  # predicted points on slices without reference
    n_localized: Optional[int] = None  # reference slices whose point falls inside the mask
    missing_slices: list = field(default_factory=list)
    extra_slices: list = field(default_factory=list)

    @property
    def mse_mm2(self) -> float:
        """Mean squared distance over the compared slices; nan when none."""
        v = list(self.squared_mm2.values())
        return float(np.mean(v)) if v else float("nan")

    @property
    def max_distance_mm(self) -> float:
        v = list(self.squared_mm2.values())
        return float(np.sqrt(max(v))) if v else float("nan")

    @property
    def localization_rate(self) -> float:
        """Localized reference slices / reference slices (missing points count as misses)."""
        if self.n_localized is None:
            return float("nan")
        return _ratio(self.n_localized, self.n_slices_ref)


def _as_points(pred, shape, axis) -> dict:
    """Predicted centerline as {slice: voxel 3-vector}, from a mask or an (n, 3) point list."""
    if isinstance(pred, Mapping):
        return {int(k): np.asarray(v, float) for k, v in pred.items()}
    arr = np.asarray(pred)
    if arr.ndim == 3:
        if arr.shape != tuple(shape):
            raise ValueError(f"centerline mask shape {arr.shape} differs from reference {tuple(shape)}")
        return slice_centers(arr, axis)
    if arr.ndim == 2 and arr.shape[1] == 3:
        groups: dict = {}
        for p in arr.astype(float):
            groups.setdefault(int(np.floor(p[axis] + 0.5)), []).append(p)
        out = {}
        for s, pts in groups.items():
            c = np.mean(pts, axis=0)
            c[axis] = float(s)
            out[s] = c
        return out
    raise ValueError("centerline must be a 3D mask or an (n, 3) array of voxel coordinates")


def centerline_errors(
    pred,
    ref: ArrayLike,
    *,
    affine: Optional[np.ndarray] = None,
    zooms: Optional[Sequence[float]] = None,
    axis: Optional[int] = None,
    ref_is_mask: bool = True,
) -> CenterlineErrors:
    """Compare a centerline with the per-slice centre of mass of a reference mask.

    pred: centerline on the reference grid -- a 3D mask (its per-slice centre of mass is
    the point; a proper centerline has one voxel per slice), an (n, 3) array of voxel
    coordinates (points are grouped by their rounded slice coordinate and averaged), or a
    mapping slice -> voxel 3-vector.
    ref: reference mask (cord mask, or a centerline mask then ``ref_is_mask=False``).
    Geometry: ``affine`` (4x4; slice axis from its orientation unless ``axis`` is given) or
    ``zooms`` (slice axis 2). The distance on each slice is measured in the slice plane, in
    mm, through the affine's linear part (exact for oblique and anisotropic grids).

    Slices are counted explicitly: the squared distance is averaged over the slices where
    both exist; reference slices without a predicted point are ``missing`` (and count as
    not localized), predicted points on slices without reference are ``extra``.
    Localization (only when ``ref_is_mask``): the point, rounded to the nearest voxel of its
    slice, lies in the reference foreground.
    """
    r = binary(ref)
    if r.ndim != 3:
        raise ValueError(f"reference must be 3D, got {r.ndim}D")
    affine, axis = _grid(3, affine, zooms, axis)
    lin = affine[:3, :3]
    ref_c = slice_centers(r, axis)
    pts = _as_points(pred, r.shape, axis)

    squared = {}
    localized = 0
    for s, c in ref_c.items():
        p = pts.get(s)
        if p is None:
            continue
        d = np.asarray(p, float) - c
        d[axis] = 0.0  # in-plane: both points lie on slice s
        squared[s] = float(np.sum((lin @ d) ** 2))
        if ref_is_mask:
            v = np.floor(np.asarray(p, float) + 0.5).astype(int)
            v[axis] = s
            if np.all(v >= 0) and np.all(v < r.shape) and r[tuple(v)]:
                localized += 1
    missing = sorted(set(ref_c) - set(pts))
    extra = sorted(set(pts) - set(ref_c))
    return CenterlineErrors(
        squared_mm2=squared,
        n_slices_ref=len(ref_c),
        n_slices_pred=len(pts),
        n_slices_compared=len(squared),
        n_slices_missing=len(missing),
        n_slices_extra=len(extra),
        n_localized=localized if ref_is_mask else None,
        missing_slices=missing,
        extra_slices=extra,
    )


def centerline_mse(pred, ref: ArrayLike, *, affine=None, zooms=None, axis=None) -> float:
    """Mean squared in-plane distance (mm^2) between the centerline and the reference's
    per-slice centre of mass, over slices holding both; nan when no slice does."""
    return centerline_errors(pred, ref, affine=affine, zooms=zooms, axis=axis).mse_mm2


def localization_rate(pred, ref: ArrayLike, *, affine=None, zooms=None, axis=None) -> float:
    """Share of reference slices whose centerline point falls inside the reference mask."""
    return centerline_errors(pred, ref, affine=affine, zooms=zooms, axis=axis).localization_rate
