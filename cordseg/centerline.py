"""Centerline detection: CNN1 heatmap on axial slices, a reward volume from it, OptiC's global optimum.

The reward is built on CNN1's own grid (1 mm in-plane for the shipped model): solving there is exact for
what the answer needs, and far cheaper than at 0.5 mm. Inside the predicted cord the reward grows with the
distance to the cord's edge (so the path runs through the middle); outside it is negative and falls with the
Euclidean distance to the nearest predicted cord voxel (so gaps are bridged towards the cord, and slices
without cord are left out when their cost outweighs what they add). Rewards are per mm of cord length, so
thick and thin slices weigh alike; OptiC's penalty is per mm of displacement squared over slice thickness.

CNN1 runs twice: on whole slices, then on a window around the first curve on every slice (SECOND_LOOK_MM),
and OptiC's path through the second heatmap is the answer. The first pass only places the windows: on slices
much wider than a window (a whole neck) it looks at slices FIRST_PASS_MM apart and without the mirror image (a
quarter to an eighth of a full pass); where the windows span whole slices it is skipped, since they then do
not depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.affines import apply_affine
from scipy import ndimage as ndi

from .contract import CENTERLINE_SLICE_MM, FIRST_PASS_MM, SECOND_LOOK_MM  # noqa: F401 (defaults, kept importable here)
from .errors import InputError, ModelError, NoCordError
from .inference import Model, release_memory
from .normalization import normalize_with
from .optic import optimal_path
from .orientation import Reoriented
from .resampling import resample, resampled_zooms
from .stages import timed

DEFAULT_SMOOTHNESS = 1.0  # OptiC's lambda, per mm^2 of displacement over mm of slice thickness
SLICE_BATCH = 8
BATCH_PIXELS = 384 * 384  # at most this many pixels per CNN1 call (about 0.1 GB of activations)
STRIP_HALO = 32  # context pixels on each inner side of a strip of an over-sized slice (sparse first pass only)
# The cheap first pass (slices first_pass_mm apart, unmirrored) only on slices wider than this many windows:
# it moves the windows by a voxel here and there, which moves the answer a little (on the labelled scans, up
# to 0.02 mm^2 of centerline error either way); on smaller slices the full first pass costs little and stays.
SPARSE_FIRST_PASS_WINDOWS = 24
# CNN1 learnt on 96 mm slices. A field of view much narrower than that along one axis (a sagittal scan of a
# few thick slices, 20-25 mm across) is shown to it inside dark background up to this width (pixels of its
# 1 mm grid; normalised 0: the slice's 1st percentile): edge-repeated it lost the cord on half of the slices of
# t2_fake_lesion made 4 mm thick, and found it on all of them inside dark background (bench/thick_slices.py).
MIN_FIELD_PX = 96
# Two per-model settings live in the model contract (cordseg.contract), with these defaults:
# CENTERLINE_SLICE_MM: CNN1 need not see every thin slice: the centerline is smooth along z, so slices thinner
# than this are resampled to it for the heatmap (a 1 mm sagittal volume: half the CNN1 work), and the
# centerline is interpolated back onto every input slice.
# SECOND_LOOK_MM: CNN1 normalises each slice by its own intensity percentiles, and learnt on 96 mm crops of
# synthetic anatomy. On a full-field slice (a whole neck, 23 cm) those percentiles are set by fat and air far
# from the cord, and real anatomy offers look-alikes the crops never had: the cord drops out of some slices.
# A second look through a window this wide around the first pass's curve finds it again (measurements: CNN1
# card).


@dataclass
class Centerline:
    """One cord centre per axial slice of the RPI grid, for slices z_start..z_stop."""

    z: np.ndarray  # int RPI slice indices
    x: np.ndarray  # float RPI voxel coordinates
    y: np.ndarray
    rpi: Reoriented

    @property
    def rpi_points(self) -> np.ndarray:
        return np.column_stack([self.x, self.y, self.z.astype(float)])

    def native_points(self) -> np.ndarray:
        """(n, 3) voxel coordinates on the input image's own grid."""
        return self.rpi.points_to_native(self.rpi_points)

    def scanner_mm(self) -> np.ndarray:
        pts = self.rpi_points
        return pts @ self.rpi.affine[:3, :3].T + self.rpi.affine[:3, 3]

    def native_mask(self) -> np.ndarray:
        """uint8 mask on the input grid with one voxel per cord slice."""
        mask = np.zeros(self.rpi.shape, np.uint8)
        xi = np.clip(np.rint(self.x).astype(int), 0, self.rpi.shape[0] - 1)
        yi = np.clip(np.rint(self.y).astype(int), 0, self.rpi.shape[1] - 1)
        mask[xi, yi, self.z] = 1
        return self.rpi.to_native(mask)

    def part(self, keep: np.ndarray) -> "Centerline":
        """The points where the boolean `keep` (one per point) is true, on the same grid."""
        return Centerline(self.z[keep], self.x[keep], self.y[keep], self.rpi)

    def at(self, z_rpi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre (x, y) at any RPI slice position, clamped at the ends."""
        return np.interp(z_rpi, self.z, self.x), np.interp(z_rpi, self.z, self.y)


def model_grid(rpi: Reoriented, model: Model, min_slice_mm: float = 0.0) -> tuple:
    """Target zooms for a model: its voxel size, the input's where the metadata says 'native' (along z no
    thinner than `min_slice_mm`)."""
    zooms = [rpi.zooms[i] if v is None else v for i, v in enumerate(model.voxel_size)]
    if model.voxel_size[2] is None:
        zooms[2] = max(zooms[2], min_slice_mm)
    return tuple(zooms)


def _model_volume(rpi: Reoriented, model: Model) -> tuple[np.ndarray, tuple]:
    """The image on CNN1's grid (not normalised) and that grid's exact zooms."""
    if model.patch_shape is not None:
        raise ModelError(f"{model.path.name}: centerline models must be fully convolutional (patch 'slice')")
    target = model_grid(rpi, model, model.contract.centerline_slice_mm)
    return resample(rpi.data, rpi.zooms, target, order=1), resampled_zooms(rpi.shape, rpi.zooms, target)


def _predict_slices(slices: np.ndarray, model: Model, progress, span, mirror: bool = True,
                    field=(False, False)) -> np.ndarray:
    """CNN1 on (n, nx, ny) normalised slices, padded to the model's size multiple; progress over `span`.
    mirror: average with the left-right mirror image's answer (twice the work). field: per in-plane axis,
    whether the slices span the image's whole field of view there; such an axis narrower than MIN_FIELD_PX
    is centred in dark background up to that width."""
    m = max(1, model.size_multiple)
    n, nx, ny = slices.shape
    wide = [max(0, MIN_FIELD_PX - k) if whole else 0 for k, whole in zip((nx, ny), field)]
    if any(wide):
        lo = [w // 2 for w in wide]
        part = np.pad(slices, ((0, 0), (lo[0], wide[0] - lo[0]), (lo[1], wide[1] - lo[1])), constant_values=0.0)
        heat = _predict_slices(part, model, progress, span, mirror)
        return heat[:, lo[0]:lo[0] + nx, lo[1]:lo[1] + ny]
    pad = ((0, 0), (0, (-nx) % m), (0, (-ny) % m))
    heat = np.empty((n, nx, ny), np.float32)
    # the network's memory grows with pixels; padding a batch at a time keeps no padded copy of all slices
    batch = max(1, min(SLICE_BATCH, BATCH_PIXELS // ((nx + pad[1][1]) * (ny + pad[2][1]))))
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        part = np.pad(slices[start:stop], pad, mode="edge")
        heat[start:stop] = model.predict(part, flip_average=mirror)[:, :nx, :ny]
        if progress:
            progress("centerline", span[0] + (span[1] - span[0]) * stop / n)
    return heat


def _predict_strips(slices: np.ndarray, model: Model, progress, span) -> np.ndarray:
    """Unmirrored CNN1 on (n, nx, ny) normalised slices of more than BATCH_PIXELS pixels, in strips along x
    with STRIP_HALO pixels of context on their inner sides, so that one call's memory does not grow with the
    field of view. Near a seam the heatmap may differ slightly from the whole slice's: for the sparse first
    pass only, whose answer only places the windows."""
    m = max(1, model.size_multiple)
    n, nx, ny = slices.shape
    k = -(-nx * ny // BATCH_PIXELS)
    core = -(-nx // k)
    heat = np.empty((n, nx, ny), np.float32)
    for z in range(n):
        for x0 in range(0, nx, core):
            x1 = min(nx, x0 + core)
            a0 = max(0, (x0 - STRIP_HALO) // m * m)  # strips start on the poolings' grid
            a1 = min(nx, x1 + STRIP_HALO)
            part = slices[z:z + 1, a0:a1]
            part = np.pad(part, ((0, 0), (0, (-(a1 - a0)) % m), (0, (-ny) % m)), mode="edge")
            heat[z, x0:x1] = model.predict(part)[0, x0 - a0:x1 - a0, :ny]
        if progress:
            progress("centerline", span[0] + (span[1] - span[0]) * (z + 1) / n)
    return heat


def _whole_slices(vol: np.ndarray, model: Model, progress, span, mirror: bool = True) -> np.ndarray:
    """CNN1 on every whole slice of `vol` (the image on CNN1's grid); unmirrored, slices of more than
    BATCH_PIXELS pixels go in strips (_predict_strips)."""
    vol = normalize_with(model.normalisation, vol, model.normalisation_params)
    slices = np.moveaxis(vol, 2, 0)
    if not mirror and vol.shape[0] * vol.shape[1] > BATCH_PIXELS:
        return np.moveaxis(_predict_strips(slices, model, progress, span), 0, 2)
    return np.moveaxis(_predict_slices(slices, model, progress, span, mirror, field=(True, True)), 0, 2)


def _window_size(shape, zooms, model: Model, window_mm: float) -> list:
    """In-plane size of the second look's windows on CNN1's grid (whole slices where they are narrower)."""
    m = max(1, model.size_multiple)
    return [min(n, int(np.ceil(window_mm / z / m)) * m) for n, z in zip(shape[:2], zooms[:2])]


def _window_corners(shape, zooms, rpi: Reoriented, size, around: "Centerline") -> list:
    """Per slice of CNN1's grid, the low corner (x, y arrays) of the window centred on `around`."""
    nx, ny, nz = shape
    z_rpi = (np.arange(nz) + 0.5) * zooms[2] / rpi.zooms[2] - 0.5
    centre = [(c + 0.5) * r / z - 0.5 for c, r, z in zip(around.at(z_rpi), rpi.zooms[:2], zooms[:2])]
    return [np.clip(np.rint(c - w / 2), 0, n - w).astype(int) for c, w, n in zip(centre, size, (nx, ny))]


def _windows(vol: np.ndarray, zooms, rpi: Reoriented, model: Model, around: "Centerline", window_mm: float,
             progress, span) -> np.ndarray:
    """CNN1 on a `window_mm` square of every slice of `vol`, centred on `around`; zero elsewhere."""
    nx, ny, nz = vol.shape
    size = _window_size(vol.shape, zooms, model, window_mm)
    lo = _window_corners(vol.shape, zooms, rpi, size, around)
    windows = np.stack([vol[lo[0][z]:lo[0][z] + size[0], lo[1][z]:lo[1][z] + size[1], z] for z in range(nz)])
    windows = np.moveaxis(normalize_with(model.normalisation, np.moveaxis(windows, 0, 2),
                                         model.normalisation_params), 2, 0)
    probs = _predict_slices(windows, model, progress, span, field=[w == n for w, n in zip(size, (nx, ny))])
    heat = np.zeros(vol.shape, np.float32)
    for z in range(nz):
        heat[lo[0][z]:lo[0][z] + size[0], lo[1][z]:lo[1][z] + size[1], z] = probs[z]
    return heat


def window_heatmap(rpi: Reoriented, model: Model, around: "Centerline", window_mm: float, progress=None,
                   span=(0.0, 1.0)) -> tuple[np.ndarray, tuple]:
    """CNN1 on a `window_mm` square of every slice, centred on `around` (its end points beyond its ends),
    each window normalised on its own; zero outside the windows; on CNN1's grid, with its zooms."""
    vol, zooms = _model_volume(rpi, model)
    return _windows(vol, zooms, rpi, model, around, window_mm, progress, span), zooms


def reward(heat: np.ndarray, zooms, threshold: float) -> np.ndarray:
    """Slice-major (nz, nx, ny) reward for OptiC (see module docstring)."""
    sx, sy, sz = zooms
    out = np.empty((heat.shape[2],) + heat.shape[:2], np.float32)
    for z in range(heat.shape[2]):
        cord = heat[:, :, z] >= threshold
        if cord.any():
            depth = ndi.distance_transform_edt(cord, sampling=(sx, sy))
            dist = ndi.distance_transform_edt(~cord, sampling=(sx, sy))
            r = np.where(cord, 0.5 + depth / 2.0, -0.5 - np.minimum(dist, 10.0) / 10.0)
        else:
            r = np.full(cord.shape, -1.5)
        out[z] = r * sz
    return out


def refine(heat: np.ndarray, threshold: float, xs, ys, zs) -> tuple[np.ndarray, np.ndarray]:
    """Sub-voxel centres: heat-weighted centroid of the predicted cord region the path runs through.

    Slices where the path crosses no predicted cord (signal gaps) take the centre interpolated from
    their neighbours along the path, so one bad slice does not pull the curve.
    """
    fx, fy = xs.astype(float), ys.astype(float)
    found = np.zeros(len(zs), bool)
    for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
        h = heat[:, :, z]
        if h[x, y] < threshold:
            continue
        labels, _ = ndi.label(h >= threshold)
        region = labels == labels[x, y]
        w = np.where(region, h, 0.0)
        gx, gy = np.nonzero(region)
        total = w[gx, gy].sum()
        fx[i], fy[i] = (w[gx, gy] * gx).sum() / total, (w[gx, gy] * gy).sum() / total
        found[i] = True
    if found.any() and not found.all():
        fx[~found] = np.interp(zs[~found], zs[found], fx[found])
        fy[~found] = np.interp(zs[~found], zs[found], fy[found])
    return fx, fy


def _trace(heat: np.ndarray, zooms, rpi: Reoriented, model: Model, smoothness: float,
           offset=(0, 0)) -> Centerline | None:
    """OptiC's path through a heatmap, as sub-voxel centres on every RPI slice it spans (None: no cord).
    offset: where heat's first voxel lies in-plane on CNN1's grid (heat may be a box of it)."""
    if not (heat >= model.threshold).any():
        return None
    path = optimal_path(reward(heat, zooms, model.threshold), zooms, smoothness)
    if path is None:
        return None
    zs = path.z
    fx, fy = refine(heat, model.threshold, path.x, path.y, zs)
    fx, fy = fx + offset[0], fy + offset[1]
    # model grid -> RPI grid (extent-preserving voxel-centre mapping, as in resampling)
    scale = [z_m / z_r for z_m, z_r in zip(zooms, rpi.zooms)]
    x_r = (fx + 0.5) * scale[0] - 0.5
    y_r = (fy + 0.5) * scale[1] - 0.5
    z_r = (zs + 0.5) * scale[2] - 0.5
    z_lo, z_hi = int(np.ceil(z_r[0] - 0.5 * scale[2] + 1e-6)), int(np.floor(z_r[-1] + 0.5 * scale[2] - 1e-6))
    z_lo, z_hi = max(0, z_lo), min(rpi.shape[2] - 1, z_hi)
    z_int = np.arange(z_lo, z_hi + 1)
    if len(z_int) == 0:
        return None
    return Centerline(z_int, np.interp(z_int, z_r, x_r), np.interp(z_int, z_r, y_r), rpi)


_MODEL = object()  # detect's window_mm default: the model's own (contract's second_look_mm)


def detect(rpi: Reoriented, model: Model, *, smoothness: float = DEFAULT_SMOOTHNESS, progress=None,
           window_mm=_MODEL, on_stage=None) -> Centerline:
    """The cord's centerline in `rpi`, or NoCordError.

    Two passes: whole slices, then (unless `window_mm` is None or 0) a window of `window_mm` around the first
    curve on every slice, whose answer is kept (default: the model's second_look_mm, 56 mm unless its file
    says otherwise). The first pass only places the windows: on slices wider than SPARSE_FIRST_PASS_WINDOWS
    windows it runs on slices the model's first_pass_mm apart, without the mirror image; where the windows
    span whole slices, not at all. on_stage: stage events (cordseg.stages) for the parts, centerline.*"""
    if window_mm is _MODEL:
        window_mm = model.contract.second_look_mm
    with timed(on_stage, "centerline.resample"):
        vol, zooms = _model_volume(rpi, model)  # resampled once, for both passes
    if not window_mm:
        first = _whole_pass(vol, zooms, rpi, model, smoothness, progress, (0.0, 1.0), on_stage)
        if first is None:
            raise NoCordError("no spinal cord found")
        return first
    size = _window_size(vol.shape, zooms, model, window_mm)
    whole = tuple(size) == vol.shape[:2]
    if whole:  # windows are whole slices wherever the first curve runs: a first pass would change nothing
        first = Centerline(np.zeros(1, int), np.zeros(1), np.zeros(1), rpi)
    else:
        sparse = vol.shape[0] * vol.shape[1] > SPARSE_FIRST_PASS_WINDOWS * size[0] * size[1]
        first = _first_pass(vol, zooms, rpi, model, smoothness, progress, on_stage, sparse)
    release_memory()
    # where the windows are whole slices this is the only CNN1 pass: a first one, by its stage name
    with timed(on_stage, "centerline.cnn1" if whole else "centerline.second_look"):
        lo = _window_corners(vol.shape, zooms, rpi, size, first)
        heat = _windows(vol, zooms, rpi, model, first, window_mm, progress, (0.5, 1.0))
    # OptiC within the windows' bounding box (and one voxel of margin, so that depths inside the cord are
    # measured as on the whole slice): outside it the heat is zero and the reward no higher than on the box's
    # edge, so the optimum is the same, at a fraction of the work
    box = [(max(0, int(c.min()) - 1), min(n, int(c.max()) + w + 1)) for c, w, n in zip(lo, size, vol.shape)]
    with timed(on_stage, "centerline.optic"):
        second = _trace(heat[box[0][0]:box[0][1], box[1][0]:box[1][1]], zooms, rpi, model, smoothness,
                        offset=(box[0][0], box[1][0]))
    if second is None:
        if whole:
            raise NoCordError("no spinal cord found")
        return first
    return second


def _whole_pass(vol, zooms, rpi, model, smoothness, progress, span, on_stage, mirror=True) -> Centerline | None:
    """CNN1 on every whole slice of `vol`, then OptiC (None: no cord)."""
    with timed(on_stage, "centerline.cnn1"):
        heat = _whole_slices(vol, model, progress, span, mirror=mirror)
    with timed(on_stage, "centerline.optic"):
        return _trace(heat, zooms, rpi, model, smoothness)


def _first_pass(vol, zooms, rpi, model, smoothness, progress, on_stage, sparse=True) -> Centerline:
    """The first curve: CNN1 on whole slices; with `sparse`, about first_pass_mm apart and unmirrored, and
    on every slice, mirrored, only when that finds nothing; NoCordError when no pass finds a cord."""
    first = None
    if sparse:
        step_mm = model.contract.first_pass_mm
        few, fzooms = vol, zooms
        if step_mm > zooms[2] and vol.shape[2] > 1:
            with timed(on_stage, "centerline.resample"):
                target = (zooms[0], zooms[1], step_mm)
                few = resample(vol, zooms, target, order=0)  # whole slices, not blends of two
                fzooms = resampled_zooms(vol.shape, zooms, target)
        first = _whole_pass(few, fzooms, rpi, model, smoothness, progress, (0.0, 0.5), on_stage, mirror=False)
    if first is None:
        first = _whole_pass(vol, zooms, rpi, model, smoothness, progress, (0.0, 0.5), on_stage)
    if first is None:
        raise NoCordError("no spinal cord found")
    return first


def from_mask(rpi: Reoriented, mask_data: np.ndarray, mask_affine: np.ndarray) -> Centerline:
    """A given centerline (a mask: one or a few voxels per slice, on any grid) on `rpi`'s slices.

    Each marked voxel is placed in `rpi`'s voxel space through scanner coordinates, so the mask may come from
    another grid of the same session (a 0.5 mm resampling, a sagittal view). Slices with several points take
    their mean; slices between marked ones are interpolated linearly, so a point every few centimetres is
    enough; the centerline runs from the lowest marked slice to the highest (no extrapolation).
    """
    idx = np.argwhere(np.asarray(mask_data) > 0)
    if len(idx) == 0:
        raise InputError("the centerline mask has no marked voxel")
    pts = apply_affine(np.linalg.inv(rpi.affine) @ np.asarray(mask_affine, float), idx)  # mask -> RPI voxels
    z_round = np.rint(pts[:, 2]).astype(int)
    inside = (z_round >= 0) & (z_round < rpi.shape[2])
    if not inside.any():
        raise InputError("the centerline mask lies outside the image's field of view")
    pts, z_round = pts[inside], z_round[inside]
    zs = np.unique(z_round)
    xs = np.array([pts[z_round == z, 0].mean() for z in zs])
    ys = np.array([pts[z_round == z, 1].mean() for z in zs])
    z_int = np.arange(zs[0], zs[-1] + 1)
    return Centerline(z_int, np.interp(z_int, zs, xs), np.interp(z_int, zs, ys), rpi)
