"""MS lesions after the lesion network: screening against the cord, the slabs that need a cord mask, the
per-lesion contrast, and the lesion table.

The lesion network's false lesions are bright grey matter and specks in thin bright CSF; t2 and t2s lesions
are hyper-intense by definition. A reported lesion therefore touches the cord and is brighter than the
lesion-free cord on its slices by the lesion model's `min_lesion_contrast`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .metrics import axial_axis, label_lesions

MIN_REFERENCE_VOXELS = 20  # lesion-free cord voxels needed to judge a lesion's contrast
_CUBE = np.ones((3, 3, 3), bool)
LESION_CSV_HEADER = ["id", "volume_mm3", "x_mm", "y_mm", "z_mm", "first_slice", "last_slice", "mean_probability",
                     "max_probability", "contrast"]


def lesion_slabs(mask: np.ndarray, merge_gap: int) -> list[tuple[int, int]]:
    """Inclusive axial slice ranges (axis 2) holding the mask's voxels, ranges closer than `merge_gap`
    slices joined: where a cord mask is needed to judge the lesions, and no more."""
    zs = np.nonzero(mask.any(axis=(0, 1)))[0]
    slabs = []
    for z in zs:
        if slabs and z - slabs[-1][1] <= merge_gap:
            slabs[-1][1] = int(z)
        else:
            slabs.append([int(z), int(z)])
    return [tuple(s) for s in slabs]


def lesion_contrasts(mask: np.ndarray, image: np.ndarray, cord: np.ndarray) -> tuple[np.ndarray, list]:
    """(labels, [contrast of each 26-connected lesion]): its mean intensity over the median of the
    lesion-free cord on the axial slices it spans (RPI arrays; axis 2 is inferior-superior).

    Intensities are taken above a floor (0, or the image's lowest values where it has negative ones) so
    that an offset image measures alike. None where the cord on those slices is too small to say."""
    labels, _ = label_lesions(mask)
    return labels, _ratios(labels, image, cord)


def _ratios(labels, image, cord) -> list:
    floor = min(0.0, float(np.percentile(image, 0.5)))
    healthy = cord.astype(bool) & (labels == 0)
    out = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        zs = slice(sl[2].start, sl[2].stop)
        ref = image[:, :, zs][healthy[:, :, zs]]
        base = float(np.median(ref)) - floor if ref.size >= MIN_REFERENCE_VOXELS else 0.0
        lesion = image[sl][labels[sl] == i]  # within its bounding box, not the whole volume per lesion
        out.append(float(lesion.mean() - floor) / base if base > 0 else None)
    return out


def grow_lesions(mask: np.ndarray, prob: np.ndarray, low: float) -> np.ndarray:
    """Hysteresis: every region of `prob` >= `low` that holds a voxel of `mask` joins the mask whole.

    The network's map often rises above the threshold only in a lesion's brightest core while the rest of
    the lesion sits at 0.2-0.5; a lesion is found by how much of it is covered, so the core is grown to
    the map's lower contour, never starting a lesion there."""
    seeds = mask.astype(bool)
    if low <= 0 or not seeds.any():
        return mask
    region, _ = label_lesions(prob >= low)
    keep = np.unique(region[seeds & (region > 0)])
    return (seeds | np.isin(region, keep[keep > 0])).astype(mask.dtype)


def fill_to_edge(mask: np.ndarray, image: np.ndarray, cord: np.ndarray, fraction: float = 0.5,
                 zooms=(1.0, 1.0, 1.0), reach_mm: float = 1.5) -> np.ndarray:
    """Each lesion grown, within `reach_mm` of it (per axis: no growth across slices thicker than that) and
    inside `cord`, over the voxels brighter than `fraction` of the way from the lesion-free cord's median to
    the lesion's own median: its outline at that share of its contrast (0.5: the half-maximum edge)."""
    labels, _ = label_lesions(mask)
    if labels.max() == 0:
        return mask
    steps = [int(np.floor(reach_mm / float(z) + 1e-6)) for z in zooms]
    if not any(steps):
        return mask
    cord = cord.astype(bool)
    healthy = cord & ~mask.astype(bool)
    out = mask.astype(bool).copy()
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        box = tuple(slice(max(0, s.start - n), s.stop + n) for s, n in zip(sl, steps))
        own = labels[box] == i
        zs = slice(box[2].start, box[2].stop)
        ref = image[:, :, zs][healthy[:, :, zs]]
        if ref.size < MIN_REFERENCE_VOXELS:
            continue
        base = float(np.median(ref))
        level = base + fraction * (float(np.median(image[box][own])) - base)
        if level <= base:
            continue
        near = own
        for axis, n in enumerate(steps):
            if n:
                line = np.ones([3 if a == axis else 1 for a in range(3)], bool)
                near = ndi.binary_dilation(near, line, iterations=n)
        near &= cord[box] & (image[box] >= level)
        grown, _ = ndi.label(near | own, _CUBE)
        keep = np.unique(grown[own])
        out[box] |= np.isin(grown, keep[keep > 0])
    return out.astype(mask.dtype)


def screen_lesions(mask: np.ndarray, image: np.ndarray, cord: np.ndarray, min_contrast: float):
    """`mask` without the lesions that lie wholly outside `cord` or are not brighter than the cord around
    them by `min_contrast`. Returns (mask, number dropped)."""
    labels, contrasts = lesion_contrasts(mask, image, cord)
    inside = ndi.maximum(cord.astype(bool), labels, index=np.arange(1, len(contrasts) + 1))
    drop = [i for i, (c, touches) in enumerate(zip(contrasts, np.atleast_1d(inside)), start=1)
            if not touches or (c is not None and c < min_contrast)]
    if not drop:
        return mask, 0
    return np.where(np.isin(labels, drop), 0, mask).astype(mask.dtype), len(drop)


def cord_along_lesions(mask: np.ndarray, cl, sc_model, progress=None, on_stage=None) -> np.ndarray:
    """The cord on `cl`'s RPI grid, segmented with `sc_model` only along the stretches of centerline that hold
    lesions (a patch depth apart or more: separate runs), which keeps screening cheap next to the lesion
    network's own pass. Stage events of the cord runs: screening.cord.*"""
    from . import centerline as _centerline
    from . import segmentation as _segmentation

    parts = None if on_stage is None else (lambda e: on_stage(e._replace(stage="screening." + e.stage)))
    rpi = cl.rpi
    depth = int(np.ceil(sc_model.patch_shape[2] * _centerline.model_grid(rpi, sc_model)[2] / rpi.zooms[2]))
    cord = np.zeros(mask.shape, np.uint8)
    for lo, hi in lesion_slabs(mask, merge_gap=depth):
        on = (cl.z >= lo - 1) & (cl.z <= hi + 1)
        if not on.any():
            continue
        stretch = _centerline.Centerline(cl.z[on], cl.x[on], cl.y[on], rpi)
        prob = _segmentation.soft_segmentation(stretch, sc_model, progress, stage="cord", on_stage=parts)
        cord |= _segmentation.keep_largest_component((prob >= sc_model.threshold).astype(np.uint8))
    return cord


def screen(mask: np.ndarray, cl, sc_model, min_contrast: float, progress=None, on_stage=None) -> np.ndarray:
    """Screen a thresholded lesion mask on `cl`'s RPI grid against the cord along its lesions."""
    cord = cord_along_lesions(mask, cl, sc_model, progress, on_stage)
    return screen_lesions(mask, cl.rpi.data, cord, min_contrast)[0]


@dataclass
class Lesion:
    id: int
    volume_mm3: float
    centroid_mm: tuple
    first_slice: int
    last_slice: int
    mean_probability: float | None = None  # the network's map over the lesion (from `prob`)
    max_probability: float | None = None
    contrast: float | None = None  # mean intensity over the lesion-free cord's median on its slices

    def csv_row(self) -> list:
        """The row under LESION_CSV_HEADER (empty cells where a value is unknown)."""
        def opt(v, fmt):
            return "" if v is None else format(v, fmt)

        return [self.id, f"{self.volume_mm3:.2f}", *(f"{v:.2f}" for v in self.centroid_mm), self.first_slice,
                self.last_slice, opt(self.mean_probability, ".3f"), opt(self.max_probability, ".3f"),
                opt(self.contrast, ".3f")]


def lesion_table(mask_img, prob=None, image=None, cord=None) -> list[Lesion]:
    """One row per 3D connected lesion (26-connectivity), slices along the axial axis of the image.

    With `prob` (the soft map on the mask's grid) each row gets the mean and maximum probability; with
    `image` and `cord` (arrays on the mask's grid) its brightness over the lesion-free cord on its slices,
    so that users can rank lesions and review the doubtful ones first."""
    data = np.asarray(mask_img.dataobj) > 0
    if not data.any():
        return []
    labels, _ = label_lesions(data)
    zooms = mask_img.header.get_zooms()[:3]
    voxel = float(np.prod(zooms))
    axial = axial_axis(mask_img.affine)
    ratios = None
    if image is not None and cord is not None:
        image = np.asarray(image, np.float32)
        ratios = _contrasts_along(labels, image, np.asarray(cord) > 0, axial)
    rows = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        comp = labels[sl] == i
        idx = np.argwhere(comp) + [s.start for s in sl]
        centroid = idx.mean(axis=0)
        mm = mask_img.affine[:3, :3] @ centroid + mask_img.affine[:3, 3]
        p = None if prob is None else np.asarray(prob, np.float32)[sl][comp]
        rows.append(Lesion(i, float(comp.sum() * voxel), tuple(float(v) for v in mm),
                           int(idx[:, axial].min()), int(idx[:, axial].max()),
                           None if p is None else float(p.mean()), None if p is None else float(p.max()),
                           None if ratios is None else ratios[i - 1]))
    return rows


def _contrasts_along(labels, image, cord, axial):
    """lesion_contrasts' ratios for labelled lesions on an image whose axial axis is `axial`."""
    if axial != 2:
        labels, image, cord = (np.moveaxis(a, axial, 2) for a in (labels, image, cord))
    return _ratios(labels, image, cord)
