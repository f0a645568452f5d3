"""MS lesions after the lesion network: screening against the cord, the slabs that need a cord mask, the
per-lesion contrast, and the lesion table.

The lesion network's false lesions are bright grey matter and specks in thin bright CSF; t2 and t2s lesions
are hyper-intense by definition. A reported lesion therefore touches the cord and is brighter than the cord
around it, by a bar the lesion model names (`min_lesion_contrast`) or, for "adaptive" models, by the bar the
scan sets itself: what the lesion's own shape measures elsewhere on the same cord.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .contract import LESION_CONTRAST_FLOOR
from .metrics import axial_axis, label_lesions

MIN_REFERENCE_VOXELS = 20  # lesion-free cord voxels needed to judge a lesion's contrast
_CUBE = np.ones((3, 3, 3), bool)
LESION_CSV_HEADER = ["id", "volume_mm3", "x_mm", "y_mm", "z_mm", "first_slice", "last_slice", "mean_probability",
                     "max_probability", "contrast", "local_contrast"]


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


def _floor(image) -> float:
    """Where intensities are measured from: 0, or the image's lowest values where it has negative ones, so
    that an offset image measures alike."""
    if float(np.min(image)) >= 0.0:  # the percentile of a non-negative image is never below 0
        return 0.0
    return min(0.0, float(np.percentile(image, 0.5)))


def _ratios(labels, image, cord) -> list:
    floor = _floor(image)
    healthy = cord.astype(bool) & (labels == 0)
    out = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        zs = slice(sl[2].start, sl[2].stop)
        ref = image[:, :, zs][healthy[:, :, zs]]
        base = float(np.median(ref)) - floor if ref.size >= MIN_REFERENCE_VOXELS else 0.0
        lesion = image[sl][labels[sl] == i]  # within its bounding box, not the whole volume per lesion
        out.append(float(lesion.mean() - floor) / base if base > 0 else None)
    return out


LOCAL_REACH_MM = 20.0  # reference slices for a lesion's local contrast: this far above and below it
ADAPTIVE_MIN_PLACES = 5  # "adaptive" screening: fewer places of a lesion's shape than this -> the fixed bar


def cord_levels(image: np.ndarray, healthy: np.ndarray, floor: float) -> np.ndarray:
    """Per axial slice, the median of the lesion-free cord above `floor` (NaN where too little cord)."""
    out = np.full(image.shape[2], np.nan)
    for z in np.nonzero(healthy.any(axis=(0, 1)))[0]:
        ref = image[:, :, z][healthy[:, :, z]]
        if ref.size >= MIN_REFERENCE_VOXELS:
            out[z] = float(np.median(ref)) - floor
    return out


def local_contrasts(labels: np.ndarray, image: np.ndarray, cord: np.ndarray, zooms=(1.0, 1.0, 1.0),
                    reach_mm: float = LOCAL_REACH_MM) -> list:
    """Each labelled lesion's brightness over the same places of the cord on the slices above and below it
    (within `reach_mm`, the lesion's own slices and their neighbours left out), both as shares of the cord's
    level on their own slices; None where no such slice has cord.

    Unlike the contrast over the whole cord's median on its slices, this does not take brighter grey matter,
    or a bright cord edge, for a lesion: those are as bright on the other slices."""
    ctx = _LocalContext(labels, image, cord, zooms, reach_mm)
    return [ctx.contrast(vox) for vox in _voxels(labels)]


def null_contrasts(labels: np.ndarray, image: np.ndarray, cord: np.ndarray, zooms=(1.0, 1.0, 1.0),
                   reach_mm: float = LOCAL_REACH_MM) -> list:
    """For each labelled lesion, the local contrasts (local_contrasts) of its own shape moved along the cord
    of the same scan, in steps of half its length, following the cord's centre, wherever the moved shape
    clears its own slices and every labelled lesion: what that shape measures on this scan where there is
    (most likely) no lesion. An array per lesion, possibly empty; empty for a lesion within the local
    reach of the cord's first or last slice, whose reference is one-sided and where a coil's shading
    changes fastest: the middle of the cord does not tell what is normal there.

    The spread of these is the scan's own: noise, grey matter, shading and partial volume at that size."""
    return _null_contrasts(_LocalContext(labels, image, cord, zooms, reach_mm), labels, _voxels(labels))


def _null_contrasts(ctx, labels, voxels) -> list:
    image = ctx.image
    has = ctx.cord.any(axis=(0, 1))
    span = np.nonzero(has)[0]
    avoid = _near_lesions(labels)
    nz = image.shape[2]
    out = []
    for vox in voxels:
        z0, z1 = int(vox[:, 2].min()), int(vox[:, 2].max())
        ext = z1 - z0 + 1
        found = []
        if not span.size or z0 - span[0] < ctx.reach or span[-1] - z1 < ctx.reach:
            out.append(np.zeros(0))
            continue
        for dz in range(-z0, nz - z1, max(1, ext // 2)):
            if abs(dz) <= ext or not has[vox[:, 2] + dz].all():
                continue
            z = vox[:, 2] + dz
            moved = np.rint(vox[:, :2] - ctx.centres[vox[:, 2]] + ctx.centres[z]).astype(int)
            if (moved < 0).any() or (moved >= image.shape[:2]).any() or avoid[moved[:, 0], moved[:, 1], z].any():
                continue
            c = ctx.contrast(np.column_stack([moved, z]))
            if c is not None:
                found.append(c)
        out.append(np.asarray(found, float))
    return out


def _near_lesions(labels):
    """Every labelled voxel and those within two steps of one (dilated within the lesions' boxes only)."""
    out = np.zeros(labels.shape, bool)
    for sl in ndi.find_objects(labels):
        box = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in sl)
        out[box] |= ndi.binary_dilation(labels[box] > 0, iterations=2)
    return out


def _voxels(labels):
    """Each label's voxel indices, in label order."""
    return [np.argwhere(labels[sl] == i) + [s.start for s in sl]
            for i, sl in enumerate(ndi.find_objects(labels), start=1)]


class _LocalContext:
    """What local contrasts of one scan share: the cord's level per slice (lesions left out), its centre per
    slice, the slices that can serve as a reference."""

    def __init__(self, labels, image, cord, zooms, reach_mm):
        from .normalization import centres_from_mask

        self.image = image
        self.cord = cord.astype(bool)
        self.floor = _floor(image)
        self.levels = cord_levels(image, self.cord & (labels == 0), self.floor)
        self.centres = centres_from_mask(self.cord)
        self.has_cord = self.cord.any(axis=(0, 1)) & np.isfinite(self.levels) & (self.levels > 0)
        self.reach = local_reach_slices(zooms, reach_mm)
        self.gap = 1 if float(zooms[2]) <= 2.0 else 0

    def _refs(self, z0, z1):
        """Reference slices for voxels on slices z0..z1: within reach, clear of them and their neighbours."""
        return [z for z in range(max(0, z0 - self.reach), min(self.image.shape[2], z1 + self.reach + 1))
                if (z < z0 - self.gap or z > z1 + self.gap) and self.has_cord[z]]

    def _own_and_expected(self, vox, refs):
        """Each voxel's brightness on its slice's level, and the median of its place (offset from the cord's
        centre) on the reference slices, each on its own slice's level."""
        off = vox[:, :2] - self.centres[vox[:, 2]]
        zs = np.asarray(refs)
        px = self.centres[zs, 0][None, :] + off[:, :1]
        py = self.centres[zs, 1][None, :] + off[:, 1:]
        pz = np.broadcast_to(zs[None, :].astype(float), px.shape)
        samples = ndi.map_coordinates(self.image, [px.ravel(), py.ravel(), pz.ravel()], order=1, mode="nearest")
        expected = np.median((samples.reshape(px.shape) - self.floor) / self.levels[zs][None, :], axis=1)
        own = (self.image[vox[:, 0], vox[:, 1], vox[:, 2]] - self.floor) / self.levels[vox[:, 2]]
        return own, expected

    def contrast(self, vox) -> float | None:
        """The local contrast of the voxels `vox` (N x 3 indices) taken together."""
        refs = self._refs(int(vox[:, 2].min()), int(vox[:, 2].max()))
        own_levels = self.levels[vox[:, 2]]
        if not refs or not np.all(np.isfinite(own_levels) & (own_levels > 0)):
            return None
        own, expected = self._own_and_expected(vox, refs)
        base = float(expected.mean())
        return float(own.mean()) / base if base > 0 else None

    def voxel_ratios(self, vox) -> np.ndarray:
        """Each voxel's own local contrast (NaN where its slice has no level or no reference slice)."""
        out = np.full(len(vox), np.nan)
        for z in np.unique(vox[:, 2]):
            refs = self._refs(int(z), int(z))
            if not refs or not (np.isfinite(self.levels[z]) and self.levels[z] > 0):
                continue
            on = vox[:, 2] == z
            own, expected = self._own_and_expected(vox[on], refs)
            out[on] = np.where(expected > 0, own / np.where(expected > 0, expected, 1.0), np.nan)
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


def grow_to_local_edge(mask: np.ndarray, prob: np.ndarray, image: np.ndarray, cord: np.ndarray,
                       zooms=(1.0, 1.0, 1.0), share: float = 0.5, low: float = 0.1,
                       reach_mm: float = LOCAL_REACH_MM) -> np.ndarray:
    """Each lesion grown by one voxel (its 6 neighbours; in-plane only where slices are thicker than 2 mm) into
    the cord where the network's map still gives at least `low` and the voxel is brighter than its own places
    above and below (local_contrasts, voxel by voxel) by at least `share` of the lesion's own local contrast.

    On a faint lesion the map rises above the threshold on the bright core only; its partial-volume rim is
    still brighter than the same places of the cord elsewhere, and the network half-sees it."""
    labels, _ = label_lesions(mask)
    if labels.max() == 0:
        return mask
    ctx = _LocalContext(labels, image, cord, zooms, reach_mm)
    step = ndi.generate_binary_structure(3, 1)
    if float(zooms[2]) > 2.0:
        step[:, :, 0] = step[:, :, 2] = False
    out = mask.astype(bool).copy()
    for i, (vox, sl) in enumerate(zip(_voxels(labels), ndi.find_objects(labels)), start=1):
        c = ctx.contrast(vox)
        if c is None or c <= 1.0:
            continue
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
        own = labels[box] == i
        ring = ndi.binary_dilation(own, step) & ~own & ctx.cord[box] & (prob[box] >= low)
        near = np.argwhere(ring) + [s.start for s in box]
        if near.size:
            near = near[ctx.voxel_ratios(near) >= 1.0 + share * (c - 1.0)]
            out[near[:, 0], near[:, 1], near[:, 2]] = True
    return out.astype(mask.dtype)


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


def screen_lesions(mask: np.ndarray, image: np.ndarray, cord: np.ndarray, min_contrast: float, *,
                   measure: str = "slice", zooms=(1.0, 1.0, 1.0), floor: float = LESION_CONTRAST_FLOOR):
    """`mask` without the lesions that lie wholly outside `cord` or are not bright enough. `measure`:
    - "slice": brighter than the lesion-free cord on their slices by `min_contrast`;
    - "local": brighter than the same places of the cord on the slices above and below by `min_contrast`
      (local_contrasts; "slice" for a lesion with no such slice);
    - "adaptive": the local contrast, against a bar set by the scan itself: the highest local contrast of
      the lesion's own shape moved along this scan's cord (null_contrasts), and no lower than `floor`;
      `min_contrast` where fewer than ADAPTIVE_MIN_PLACES such places exist. A noisy or shaded scan raises
      its own bar; a clean one lets a faint lesion through. `cord` should then cover the whole cord.
    Returns (mask, number dropped)."""
    labels, contrasts = lesion_contrasts(mask, image, cord)
    bars = [min_contrast] * len(contrasts)
    voxels = _voxels(labels)
    if measure in ("local", "adaptive"):
        ctx = _LocalContext(labels, image, cord, zooms, LOCAL_REACH_MM)
        contrasts = [c if v is None else v for c, v in zip(contrasts, (ctx.contrast(vox) for vox in voxels))]
        if measure == "adaptive":
            bars = [max(floor, float(n.max())) if n.size >= ADAPTIVE_MIN_PLACES else min_contrast
                    for n in _null_contrasts(ctx, labels, voxels)]
    cord = cord.astype(bool)
    inside = [bool(cord[vox[:, 0], vox[:, 1], vox[:, 2]].any()) for vox in voxels]
    drop = [i for i, (c, bar, touches) in enumerate(zip(contrasts, bars, inside), start=1)
            if not touches or (c is not None and c < bar)]
    if not drop:
        return mask, 0
    return np.where(np.isin(labels, drop), 0, mask).astype(mask.dtype), len(drop)


def local_reach_slices(zooms, reach_mm: float = LOCAL_REACH_MM) -> int:
    """Slices of cord beyond a lesion's own that local_contrasts looks at."""
    return max(2, int(np.ceil(reach_mm / float(zooms[2]))))


def cord_along_lesions(mask: np.ndarray, cl, sc_model, progress=None, on_stage=None, margin: int = 0,
                       threshold: float | None = None) -> np.ndarray:
    """The cord on `cl`'s RPI grid, segmented with `sc_model` only along the stretches of centerline that hold
    lesions, `margin` slices on (a patch depth apart or more: separate runs), which keeps screening cheap next
    to the lesion network's own pass. threshold: the cord model's for the image's contrast (default: its
    common one). Stage events of the cord runs: screening.cord.*"""
    from . import centerline as _centerline
    from . import segmentation as _segmentation

    parts = None if on_stage is None else (lambda e: on_stage(e._replace(stage="screening." + e.stage)))
    rpi = cl.rpi
    depth = int(np.ceil(sc_model.patch_shape[2] * _centerline.model_grid(rpi, sc_model)[2] / rpi.zooms[2]))
    thr = sc_model.threshold if threshold is None else threshold
    cord = np.zeros(mask.shape, np.uint8)
    for lo, hi in lesion_slabs(mask, merge_gap=depth + 2 * margin):
        on = (cl.z >= lo - 1 - margin) & (cl.z <= hi + 1 + margin)
        if not on.any():
            continue
        prob = _segmentation.soft_segmentation(cl.part(on), sc_model, progress, stage="cord", on_stage=parts)
        cord |= _segmentation.keep_largest_component((prob >= thr).astype(np.uint8))
    return cord


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
    local_contrast: float | None = None  # over the same places of the cord above and below (local_contrasts)

    def csv_row(self) -> list:
        """The row under LESION_CSV_HEADER (empty cells where a value is unknown)."""
        def opt(v, fmt):
            return "" if v is None else format(v, fmt)

        return [self.id, f"{self.volume_mm3:.2f}", *(f"{v:.2f}" for v in self.centroid_mm), self.first_slice,
                self.last_slice, opt(self.mean_probability, ".3f"), opt(self.max_probability, ".3f"),
                opt(self.contrast, ".3f"), opt(self.local_contrast, ".3f")]


def lesion_table(mask_img, prob=None, image=None, cord=None) -> list[Lesion]:
    """One row per 3D connected lesion (26-connectivity), slices along the axial axis of the image.

    With `prob` (the soft map on the mask's grid) each row gets the mean and maximum probability; with
    `image` and `cord` (arrays on the mask's grid) its brightness over the lesion-free cord on its slices and
    over the same places of the cord above and below, so that users can rank lesions and review the doubtful
    ones first."""
    data = np.asarray(mask_img.dataobj) > 0
    if not data.any():
        return []
    zooms = mask_img.header.get_zooms()[:3]
    voxel = float(np.prod(zooms))
    axial = axial_axis(mask_img.affine)
    contrasts = image is not None and cord is not None
    cord = np.asarray(cord) > 0 if contrasts else None
    box = _table_box(data, cord, axial, image)
    labels, _ = label_lesions(data[box])
    ratios = local = None
    if contrasts:
        ratios, local = _contrasts_along(labels, np.asarray(image[box], np.float32), cord[box], axial, zooms)
    if prob is not None:
        prob = np.asarray(np.asarray(prob)[box], np.float32)
    offset = [b.start for b in box]
    rows = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        comp = labels[sl] == i
        idx = np.argwhere(comp) + [s.start + o for s, o in zip(sl, offset)]
        centroid = idx.mean(axis=0)
        mm = mask_img.affine[:3, :3] @ centroid + mask_img.affine[:3, 3]
        p = None if prob is None else prob[sl][comp]
        rows.append(Lesion(i, float(comp.sum() * voxel), tuple(float(v) for v in mm),
                           int(idx[:, axial].min()), int(idx[:, axial].max()),
                           None if p is None else float(p.mean()), None if p is None else float(p.max()),
                           None if ratios is None else ratios[i - 1], None if local is None else local[i - 1]))
    return rows


def _table_box(mask, cord, axial, image):
    """The part of the volume the table needs (slices per axis): the lesions and the cord, widened across the
    axial axis by the cord's own extent, so that every place local_contrasts samples (a lesion voxel moved
    with the cord's centre) lies inside it and reads what it reads in the whole volume. The whole volume where
    the image has negative values (their floor is a percentile of the whole image)."""
    has_cord = cord is not None and cord.any()
    if has_cord and float(np.min(image)) < 0.0:
        return tuple(slice(0, n) for n in mask.shape)
    box = _bounds(mask)
    if has_cord:
        around = _bounds(cord)
        box = [slice(min(b.start, c.start), max(b.stop, c.stop)) for b, c in zip(box, around)]
        for a in range(3):
            if a != axial:
                reach = around[a].stop - around[a].start + 1
                box[a] = slice(max(0, box[a].start - reach), min(mask.shape[a], box[a].stop + reach))
    return tuple(box)


def _bounds(mask) -> list:
    """Bounding box of a non-empty boolean volume, one slice per axis (projections, not a labelling)."""
    out = []
    for a in range(3):
        hit = np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return out


def _contrasts_along(labels, image, cord, axial, zooms):
    """(lesion_contrasts' ratios, local_contrasts) for labelled lesions on an image whose axial axis is
    `axial`. Voxels are taken as square in plane for the local contrast's centres (its reach is along the
    axial axis only)."""
    if axial != 2:
        labels, image, cord = (np.moveaxis(a, axial, 2) for a in (labels, image, cord))
        zooms = tuple(float(zooms[i]) for i in range(3) if i != axial) + (float(zooms[axial]),)
    return _ratios(labels, image, cord), local_contrasts(labels, image, cord, zooms)
