"""Evaluation sets of MS cord lesions inserted into real lesion-free scans, by two procedures built apart
from training.

    python bench/lesion_sets.py build --set choose|choose2|report [--data DIR] [--out DIR] [--force]

Two insertion procedures that share no code and no modelling assumption with training/synth.py (union of
ellipsoids, Gaussian-blurred edge, replacement by a uniform lesion/cord gain on a label map, then degraded)
nor with bench/lesions.py (ellipsoid or spherical-harmonic shape, Gaussian multiplicative profile), nor with
each other:

- "tube" (the CHOOSE set's procedure): a skeleton drawn as a random walk along the cord (in-plane offset from
  the cord's own centre curve, so the lesion follows the cord), swept by an elliptic cross-section whose radius
  varies smoothly along the walk (log-normal wobble, tapered ends), with 0-2 short side branches; built as a
  hard occupancy on a fine grid (<= 0.2 mm in-plane, <= 0.4 mm along the slice axis) and averaged into each
  native voxel (partial volume only from the averaging). Intensity: the lesion REPLACES the voxel's smooth
  tissue signal (normalised-convolution smooth of the cord) by its own tissue value m * (1 + a * h), where m is
  the cord median on the lesion's slices and h a depth profile (brighter inside) modulated by smooth 3D noise;
  the scan's own noise (I - smooth) is kept.
- "field" (the REPORT set's procedure): band-limited 3D noise (FFT band-pass, longer along the cord) added to
  an elongated super-ellipsoidal envelope that follows the cord's centre curve with a linear drift, then
  thresholded; the largest component is kept. Edge model: a linear ramp of the signed distance to that
  boundary (ramp width 0.3-0.9 mm), so the tissue fraction falls off across the edge before averaging into
  voxels. Intensity: MULTIPLICATIVE on the real voxels (the grey/white pattern shows through), I * (1 + g q)
  with a heterogeneous core (a second, finer noise field and a brighter centre) and, on a third of the
  lesions, a faint hypo-intense rim just outside the boundary.

Common to both (the things being measured, not modelled): lesions are intramedullary (intensity changed only
on cord-mask voxels; they may touch the cord's edge), elongated along the cord (in-plane diameter 2-5 mm,
length 5-20 mm, some up to 40 mm), 2-600 mm3, 1-3 per case, kept apart (footprints plus one voxel disjoint,
so reference lesions are separate 26-connected components). The reference lesion is the set of cord voxels at
least half filled by the lesion. The brightness ratio is mean(new image over the reference lesion) / median of
the original cord on the lesion's slices; it is solved exactly (both intensity models are linear in their
amplitude) to a target drawn per lesion: half of each set's lesions in 1.1-1.4 and half in 1.4-2.0 (a
balanced, shuffled assignment). Everything is drawn from numpy Generators seeded by (set seed, case index).

Backgrounds: every real lesion-free T2/T2*-like scan in ../shared/data; cord masks are the reference where
one exists, else cordseg.segment_cord's own mask eroded by one in-plane voxel (cached under the output
folder). Three T2*-like variants have a grey-matter butterfly (drawn here, per slice, from the cord mask's
centre and extent) brightened by 1.05-1.15x beyond what the real scans show; they carry no lesion of their
own, so anything found there in the lesion-free case is a false lesion.

Output (never inside git: work_tmp/ is ignored): <out>/<set>/<case>_<T2w|T2star>.nii.gz (image, float32,
input header), <case>_lesions.nii.gz (int16 labels), <case>.json (truth), and <out>/<set>/cases.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "work_tmp" / "lesion_eval"

SETS = {  # set -> (seed, procedure, cases per background)
    "choose": (1201, "tube", 2),
    "choose2": (5309, "tube", 2),  # a second draw of the choosing procedure, for choices the first cannot tell
    "report": (3407, "field", 3),
}
RATIO_BANDS = ((1.1, 1.4), (1.4, 2.0))
VOLUME_MM3 = (2.0, 600.0)
COUNT = (1, 3)
MAX_TISSUE_RATIO = 3.5  # lesion tissue at most this many times the cord (about CSF on T2)
FINE_INPLANE_MM = 0.2
FINE_SLICE_MM = 0.4
NEVER_SEEN = ("sct_testing", "sub-03", "lumbar")  # subjects training never uses as real backgrounds


@dataclass(frozen=True)
class Background:
    name: str
    image: str  # relative to the data folder
    cord: str | None  # reference cord mask; None: cordseg's own, eroded by one in-plane voxel
    contrast: str  # what cordseg is asked for
    subject: str
    gm_of: str | None = None  # a grey-matter-bright variant of this background
    gm_seed: int = 0
    cord_from: int | None = None  # native slice (third axis, inferior to superior) where the cord begins


BACKGROUNDS = [
    Background("t2", "sct_testing/t2/t2.nii.gz", "sct_testing/t2/t2_seg-manual.nii.gz", "t2", "sct_testing"),
    Background("mt0", "sct_testing/mt/mt0.nii.gz", "sct_testing/mt/mt0_seg.nii.gz", "t2s", "sct_testing"),
    Background("unf01_t2w", "unf01/sub-unf01_T2w.nii.gz", "unf01/sub-unf01_T2w_seg-manual.nii.gz", "t2", "unf01"),
    Background("sub01_mton", "unlabeled/sub-01_acq-MTon_MTS.nii.gz", None, "t2s", "sub-01"),
    Background("sub01_mtoff", "extra/sub-01_acq-MToff_MTS.nii.gz", None, "t2s", "sub-01"),
    Background("sub03_mtoff", "unlabeled/sub-03_acq-MToff_MTS.nii.gz", None, "t2s", "sub-03"),
    Background("sub03_mton", "extra/sub-03_acq-MTon_MTS.nii.gz", None, "t2s", "sub-03"),
    # cordseg's mask runs on into the cauda equina: lesions go above the conus tip read by eye (slices 95-102,
    # bench/accuracy.py LUMBAR_CONUS_TIP_BY_EYE), not into nerve roots
    Background("lumbar", "unlabeled/t2_lumbar.nii.gz", None, "t2", "lumbar", cord_from=103),
    Background("mt0_gm", "sct_testing/mt/mt0.nii.gz", "sct_testing/mt/mt0_seg.nii.gz", "t2s", "sct_testing",
               gm_of="mt0", gm_seed=11),
    Background("sub03_mtoff_gm", "unlabeled/sub-03_acq-MToff_MTS.nii.gz", None, "t2s", "sub-03",
               gm_of="sub03_mtoff", gm_seed=12),
    Background("sub01_mton_gm", "unlabeled/sub-01_acq-MTon_MTS.nii.gz", None, "t2s", "sub-01",
               gm_of="sub01_mton", gm_seed=13),
]
MS_SCAN = ("unlabeled/t2_ms_axial.nii.gz", "t2")


def never_seen(subject: str) -> bool:
    return subject in NEVER_SEEN


# ------------------------------------------------------------------------------------------ geometry


class Oriented:
    """A scan viewed with its slice axis (the one closest to inferior-superior) last."""

    def __init__(self, img: nib.Nifti1Image, cord: np.ndarray):
        from nibabel.orientations import aff2axcodes

        codes = aff2axcodes(img.affine)
        self.axis = [i for i, c in enumerate(codes) if c in ("S", "I")][0]
        self.data = np.moveaxis(np.asarray(img.dataobj, np.float32), self.axis, -1)
        self.cord = np.moveaxis(np.asarray(cord) > 0.5, self.axis, -1)
        order = [a for a in range(3) if a != self.axis] + [self.axis]
        self.zooms = np.asarray(img.header.get_zooms()[:3], float)[order]
        self.rot = np.asarray(img.affine, float)[:3, :3][:, order]  # voxel step -> world (RAS) mm
        self.slices = np.flatnonzero(self.cord.any(axis=(0, 1)))
        if len(self.slices) == 0:
            raise ValueError("empty cord mask")
        cx, cy = [], []
        for k in self.slices:
            ix, iy = np.nonzero(self.cord[:, :, k])
            cx.append(ix.mean())
            cy.append(iy.mean())
        self._cx, self._cy = np.array(cx), np.array(cy)
        areas = self.cord.sum(axis=(0, 1))[self.slices] * self.zooms[0] * self.zooms[1]
        self.radius_mm = float(np.sqrt(np.median(areas) / np.pi))

    def centre(self, z):
        """Cord centre (voxel x, y) at continuous slice coordinate(s) z (voxels): linear between slices."""
        return np.interp(z, self.slices, self._cx), np.interp(z, self.slices, self._cy)

    def back(self, arr):
        return np.moveaxis(arr, -1, self.axis)


class FineBox:
    """Sub-voxel samples of a native voxel box (slice axis last): positions in voxel units, per-axis sample
    counts, and the averaging of a fine field back to the box's voxels."""

    def __init__(self, lo, hi, zooms):
        self.lo, self.hi = np.asarray(lo, int), np.asarray(hi, int)
        self.n = np.array([max(3, int(np.ceil(zooms[0] / FINE_INPLANE_MM))),
                           max(3, int(np.ceil(zooms[1] / FINE_INPLANE_MM))),
                           max(3, int(np.ceil(zooms[2] / FINE_SLICE_MM)))])
        self.vox = self.hi - self.lo
        self.axes = [(np.arange(lo_, hi_)[:, None] + (np.arange(n) + 0.5)[None, :] / n - 0.5).ravel()
                     for lo_, hi_, n in zip(self.lo, self.hi, self.n)]
        self.shape = tuple(len(a) for a in self.axes)
        self.spacing = np.asarray(zooms, float) / self.n  # mm between fine samples

    @property
    def slc(self):
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    def average(self, fine):
        v, n = self.vox, self.n
        return fine.reshape(v[0], n[0], v[1], n[1], v[2], n[2]).mean(axis=(1, 3, 5))

    def cord_indicator(self, cord):
        """Cord mask on the fine samples: bilinear in-plane, constant within a slice."""
        x, y, z = np.meshgrid(*self.axes, indexing="ij")
        zi = np.clip(np.floor(z + 0.5), 0, cord.shape[2] - 1)
        vals = ndi.map_coordinates(cord.astype(np.float32), [x, y, zi], order=1, mode="constant", cval=0.0)
        return vals >= 0.5


def _box_around(o: Oriented, z_lo_vox, z_hi_vox, half_inplane_mm):
    """A native box covering the cord between two slice coordinates, widened in-plane by half_inplane_mm."""
    k0 = max(int(np.floor(z_lo_vox + 0.5)), 0)
    k1 = min(int(np.floor(z_hi_vox + 0.5)) + 1, o.data.shape[2])
    zs = np.arange(k0, k1)
    cx, cy = o.centre(zs)
    rx = half_inplane_mm / o.zooms[0] + 2
    ry = half_inplane_mm / o.zooms[1] + 2
    lo = [max(int(np.floor(cx.min() - rx)), 0), max(int(np.floor(cy.min() - ry)), 0), k0]
    hi = [min(int(np.ceil(cx.max() + rx)) + 1, o.data.shape[0]),
          min(int(np.ceil(cy.max() + ry)) + 1, o.data.shape[1]), k1]
    if any(h <= lo_ for lo_, h in zip(lo, hi)):
        return None
    return FineBox(lo, hi, o.zooms)


def _cord_median(o: Oriented, ref_box_mask, box: FineBox):
    ks = np.flatnonzero(ref_box_mask.any(axis=(0, 1))) + box.lo[2]
    sl = slice(ks.min(), ks.max() + 1)
    return float(np.median(o.data[:, :, sl][o.cord[:, :, sl]]))


def _draw_size(rng, proc):
    """(in-plane diameter mm, length mm) - each procedure its own distributions."""
    if proc == "tube":
        d = rng.uniform(2.0, 5.0)
        length = float(np.exp(rng.uniform(np.log(5.0), np.log(20.0)))) if rng.random() < 0.85 \
            else rng.uniform(20.0, 40.0)
    else:
        d = 2.0 + 3.0 * rng.beta(1.3, 1.6)
        length = min(5.0 + rng.gamma(2.0, 3.5), 20.0) if rng.random() < 0.85 else rng.uniform(20.0, 40.0)
    return float(d), float(length)


# ------------------------------------------------------------------------------------------ procedure "tube"


def _smooth_1d(rng, n, corr):
    """Unit-variance smooth noise of n samples with correlation length `corr` samples."""
    x = ndi.gaussian_filter1d(rng.normal(size=n + 6 * int(corr) + 2), max(corr, 0.5), mode="wrap")
    x = x[3 * int(corr) + 1:3 * int(corr) + 1 + n]
    return (x - x.mean()) / (x.std() + 1e-9)


def tube_lesion(o: Oriented, rng, diameter, length):
    """One lesion of the "tube" procedure. Returns (box, fraction, add_fn) or None: fraction = share of each
    box voxel inside the lesion; add_fn(a) gives the intensity change for amplitude a (both on the box)."""
    step = 0.25  # mm along the walk
    zz = o.zooms[2]
    cand = o.slices
    kc = float(cand[rng.integers(len(cand))]) + rng.uniform(-0.5, 0.5)
    z_mm = np.arange(0.0, length + step / 2, step)
    z0 = kc * zz - length / 2
    zv = (z0 + z_mm) / zz  # slice coordinate along the walk
    r0 = diameter / 2
    # offset of the walk from the cord centre, mm in-plane; may reach the cord edge
    room = max(o.radius_mm - 0.6 * r0, 0.0)
    ang, rad = rng.uniform(0, 2 * np.pi), room * np.sqrt(rng.uniform())
    off = np.array([rad * np.cos(ang), rad * np.sin(ang)])
    walk = np.cumsum(rng.normal(0.0, 0.06, (len(z_mm), 2)), axis=0)
    walk -= walk[len(walk) // 2]
    cx, cy = o.centre(zv)
    px = cx + (off[0] + walk[:, 0]) / o.zooms[0]
    py = cy + (off[1] + walk[:, 1]) / o.zooms[1]
    t = z_mm / max(length, 1e-6)
    taper = np.sqrt(np.clip(np.sin(np.pi * (0.08 + 0.84 * t)), 0.05, 1.0))
    radius = r0 * taper * np.exp(0.22 * _smooth_1d(rng, len(z_mm), 1.5 / step))
    radius = np.maximum(radius, 0.45)
    q = rng.uniform(0.6, 1.0)  # cross-section axis ratio
    phi = rng.uniform(0, np.pi)
    pts = [np.stack([px, py, zv, radius], axis=1)]
    for _ in range(rng.integers(0, 3)):  # short side branches: irregular outline
        i0 = rng.integers(len(z_mm))
        blen = rng.uniform(1.0, 3.0)
        dirn = rng.normal(size=3)
        dirn[2] *= 0.5
        dirn /= np.linalg.norm(dirn)
        s = np.arange(0.0, blen, step)[:, None]
        bx = px[i0] + s[:, 0] * dirn[0] / o.zooms[0]
        by = py[i0] + s[:, 0] * dirn[1] / o.zooms[1]
        bz = zv[i0] + s[:, 0] * dirn[2] / zz
        br = radius[i0] * rng.uniform(0.45, 0.75) * np.linspace(1.0, 0.6, len(s))
        pts.append(np.stack([bx, by, bz, br], axis=1))
    pts = np.concatenate(pts)
    box = _box_around(o, pts[:, 2].min() - r0 / zz, pts[:, 2].max() + r0 / zz,
                      r0 * 1.6 + np.abs(walk).max() + 1.0)
    if box is None:
        return None
    gx, gy, gz = box.axes
    rho = np.full(box.shape, np.inf, np.float32)
    c, sn = np.cos(phi), np.sin(phi)
    ax_a, ax_b = 1.0 / np.sqrt(q), np.sqrt(q)
    for x, y, z, r in pts:
        reach = 1.6 * r
        ix = np.flatnonzero(np.abs(gx - x) * o.zooms[0] <= reach)
        iy = np.flatnonzero(np.abs(gy - y) * o.zooms[1] <= reach)
        iz = np.flatnonzero(np.abs(gz - z) * zz <= reach)
        if not (len(ix) and len(iy) and len(iz)):
            continue
        dx = ((gx[ix] - x) * o.zooms[0])[:, None, None]
        dy = ((gy[iy] - y) * o.zooms[1])[None, :, None]
        dz = ((gz[iz] - z) * zz)[None, None, :]
        u = (c * dx + sn * dy) / (r * ax_a)
        v = (-sn * dx + c * dy) / (r * ax_b)
        d = np.sqrt(u * u + v * v + (dz / r) ** 2).astype(np.float32)
        sub = np.ix_(ix, iy, iz)
        rho[sub] = np.minimum(rho[sub], d)
    inside = (rho <= 1.0) & box.cord_indicator(o.cord)
    if not inside.any():
        return None
    depth = np.clip(1.0 - rho, 0.0, 1.0)
    tex = ndi.gaussian_filter(rng.normal(size=box.shape), 0.6 / box.spacing)
    tex = (tex - tex.mean()) / (tex.std() + 1e-9)
    h = np.clip((0.55 + 0.45 * depth ** 0.7) * (1.0 + 0.2 * tex), 0.2, None)
    frac = box.average(inside.astype(np.float32))
    hv = box.average(np.where(inside, h, 0.0).astype(np.float32))
    hmax = float(h[inside].max())
    # the voxel's smooth tissue signal: normalised convolution over the cord, in-plane, per slice
    sub_img = o.data[box.slc]
    sub_cord = o.cord[box.slc].astype(np.float32)
    sig = (1.0, 1.0, 0.0)
    smooth = ndi.gaussian_filter(sub_img * sub_cord, sig) / np.maximum(ndi.gaussian_filter(sub_cord, sig), 1e-3)

    def change(m, a):
        return frac * (m - smooth) + a * m * hv

    return box, frac, change, dict(amp_unit=hmax, shape="tube", walk_points=int(len(pts)))


# ------------------------------------------------------------------------------------------ procedure "field"


def _band_noise(rng, shape, spacing, lo_mm, hi_mm, z_stretch):
    """Unit-variance Gaussian noise keeping wavelengths between lo_mm and hi_mm (slice axis stretched)."""
    white = rng.normal(size=shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(n, d=s) for n, s in zip(shape, spacing)], indexing="ij", sparse=True)
    k = np.sqrt(freqs[0] ** 2 + freqs[1] ** 2 + (freqs[2] * z_stretch) ** 2)
    band = np.exp(-(k * lo_mm) ** 2) - np.exp(-(k * hi_mm) ** 2)
    out = np.real(np.fft.ifftn(np.fft.fftn(white) * band))
    return (out - out.mean()) / (out.std() + 1e-12)


def field_lesion(o: Oriented, rng, diameter, length):
    """One lesion of the "field" procedure (see the module docstring); same return as tube_lesion."""
    zz = o.zooms[2]
    kc = float(o.slices[rng.integers(len(o.slices))]) + rng.uniform(-0.5, 0.5)
    half = length / 2
    q = rng.uniform(0.55, 1.0)
    ax_a, ax_b = diameter / 2 / np.sqrt(q), diameter / 2 * np.sqrt(q)
    phi = rng.uniform(0, np.pi)
    p_exp = rng.uniform(1.6, 3.0)
    room = max(o.radius_mm - 0.5 * diameter / 2, 0.0)
    ang, rad = rng.uniform(0, 2 * np.pi), room * np.sqrt(rng.uniform())
    off = np.array([rad * np.cos(ang), rad * np.sin(ang)])
    drift = rng.normal(0.0, 0.04, 2)  # mm in-plane per mm along the cord
    box = _box_around(o, kc - (half + 1.5) / zz, kc + (half + 1.5) / zz,
                      max(ax_a, ax_b) * 1.5 + abs(drift).max() * half + 1.2)
    if box is None:
        return None
    gx, gy, gz = np.meshgrid(*box.axes, indexing="ij", sparse=True)
    t = (gz - kc) * zz  # mm along the cord from the lesion centre
    cx, cy = o.centre(box.axes[2])
    dx = (gx - cx[None, None, :]) * o.zooms[0] - off[0] - drift[0] * t
    dy = (gy - cy[None, None, :]) * o.zooms[1] - off[1] - drift[1] * t
    c, sn = np.cos(phi), np.sin(phi)
    u = (c * dx + sn * dy) / ax_a
    v = (-sn * dx + c * dy) / ax_b
    rho2 = (np.abs(u) ** p_exp + np.abs(v) ** p_exp) ** (2.0 / p_exp) + (t / half) ** 2
    env = 1.0 - rho2
    n1 = _band_noise(rng, box.shape, box.spacing, 0.8, rng.uniform(2.0, 3.5), 0.4)
    blob = (env + rng.uniform(0.2, 0.45) * n1) > rng.uniform(-0.12, 0.08)
    blob &= box.cord_indicator(o.cord)
    lab, n = ndi.label(blob)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    blob = lab == (int(np.argmax(sizes)) + 1)
    sd = (ndi.distance_transform_edt(blob, sampling=box.spacing)
          - ndi.distance_transform_edt(~blob, sampling=box.spacing))
    width = rng.uniform(0.3, 0.9)
    s = np.clip(0.5 + sd / width, 0.0, 1.0)
    inner = np.clip(sd, 0, None)
    core = inner / max(float(inner.max()), 1e-6)
    n2 = _band_noise(rng, box.shape, box.spacing, 0.3, 1.2, 0.7)
    qf = s * np.clip(1.0 + rng.uniform(0.1, 0.3) * n2, 0.3, None) * (1.0 + rng.uniform(0.0, 0.5) * core)
    rim_rel = rng.uniform(0.04, 0.12) if rng.random() < 1 / 3 else 0.0
    ring = np.exp(-((sd + 0.35) / 0.25) ** 2) * (sd < 0) if rim_rel else np.zeros(box.shape)
    cord_f = box.cord_indicator(o.cord)
    frac = box.average((s * cord_f).astype(np.float32))
    qv = box.average((qf * cord_f).astype(np.float32))
    rim = rim_rel * box.average((ring * cord_f).astype(np.float32))
    sub_img = o.data[box.slc]

    def change(m, g):
        return sub_img * (g * qv - rim)

    return box, frac, change, dict(amp_unit=float(qf.max()), shape="field", rim=round(float(rim_rel), 3),
                                   edge_width_mm=round(float(width), 2))


PROCEDURES = {"tube": tube_lesion, "field": field_lesion}


# ------------------------------------------------------------------------------------------ insertion


@dataclass
class LesionTruth:
    label: int
    procedure: str
    target_ratio: float
    band: str
    ratio: float  # realised: mean(new image in the reference lesion) / cord median on its slices
    volume_mm3: float
    voxels: int
    diameter_mm: float
    length_mm: float
    slices: int
    touches_cord_edge: bool
    tissue_peak_ratio: float
    cord_median: float
    extra: dict


def insert(img: nib.Nifti1Image, cord: np.ndarray, rng, procedure: str, bands: list, *, max_tries=80):
    """Write len(bands) lesions (fewer if the cord has no room) into `img`'s data on its native grid.
    bands: per lesion, an index into RATIO_BANDS. Returns (new data float32, int16 labels, [LesionTruth])."""
    o = Oriented(img, cord)
    make = PROCEDURES[procedure]
    out = o.data.copy()
    labels = np.zeros(out.shape, np.int16)
    taken = np.zeros(out.shape, bool)
    vox_mm3 = float(np.prod(o.zooms))
    rim_edge = o.cord & ~np.stack([ndi.binary_erosion(o.cord[:, :, k]) for k in range(o.cord.shape[2])], -1)
    truths = []
    for band in bands:
        lo, hi = RATIO_BANDS[band]
        placed = False
        for _ in range(max_tries):
            target = float(rng.uniform(lo, hi))
            diameter, length = _draw_size(rng, procedure)
            diameter = min(diameter, 1.6 * o.radius_mm)
            made = make(o, rng, diameter, length)
            if made is None:
                continue
            box, frac, change, extra = made
            cbox = o.cord[box.slc]
            ref = (frac >= 0.5) & cbox
            nvox = int(ref.sum())
            if nvox == 0 or not (VOLUME_MM3[0] <= nvox * vox_mm3 <= VOLUME_MM3[1]):
                continue
            if ndi.label(ref, structure=np.ones((3, 3, 3)))[1] != 1:
                continue
            foot = (frac > 0) & cbox
            grown = ndi.binary_dilation(foot | ref, structure=np.ones((3, 3, 3)))
            if (taken[box.slc] & grown).any():
                continue
            m = _cord_median(o, ref, box)
            if m <= 0:
                continue
            base = out[box.slc]
            # both intensity models are linear in the amplitude: solve for the target ratio exactly
            c0 = change(m, 0.0)
            c1 = change(m, 1.0) - c0
            num = target * m * nvox - float((base + c0)[ref].sum())
            den = float(c1[ref].sum())
            if den <= 0:
                continue
            amp = num / den
            peak = 1.0 + amp * extra["amp_unit"]
            if amp <= 0 or peak > MAX_TISSUE_RATIO:
                continue
            delta = np.where(cbox, c0 + amp * c1, 0.0)
            out[box.slc] = base + delta.astype(np.float32)
            label = len(truths) + 1
            labels[box.slc][ref] = label
            taken[box.slc] |= grown
            ks = np.flatnonzero(ref.any(axis=(0, 1)))
            truths.append(LesionTruth(
                label, procedure, round(target, 4), f"{lo:g}-{hi:g}", 0.0, round(nvox * vox_mm3, 2), nvox,
                round(diameter, 2), round(length, 2), int(len(ks)), bool((rim_edge[box.slc] & ref).any()),
                round(float(peak), 3), round(m, 3), {k: v for k, v in extra.items() if k != "amp_unit"}))
            placed = True
            break
        if not placed:
            warnings.warn(f"a lesion in band {lo:g}-{hi:g} could not be placed after {max_tries} draws")
    for t in truths:  # realised, after all lesions are in
        ref = labels == t.label
        t.ratio = round(float(out[ref].mean()) / t.cord_median, 4)
    return o.back(out), o.back(labels), truths


# ------------------------------------------------------------------------------------------ grey matter


def gm_butterfly(img: nib.Nifti1Image, cord: np.ndarray, factor: float) -> tuple[np.ndarray, float]:
    """Brighten a grey-matter butterfly (drawn per slice from the cord mask's centre and its left-right and
    anterior-posterior half-widths) by `factor`, with partial volume (5x5 sub-samples per voxel). Returns the
    new data (native order) and the butterfly's share of the cord area."""
    o = Oriented(img, cord)
    out = o.data.copy()
    # which in-plane voxel axis runs left-right / anterior-posterior, and the sign that points anterior
    lr_axis = int(np.argmax(np.abs(o.rot[0, :2])))
    ap_axis = 1 - lr_axis
    ap_sign = np.sign(o.rot[1, ap_axis]) or 1.0
    sub = (np.arange(5) + 0.5) / 5 - 0.5
    gm_total, cord_total = 0.0, 0.0
    for k in o.slices:
        m = o.cord[:, :, k]
        ix, iy = np.nonzero(m)
        c = np.array([ix.mean(), iy.mean()])
        pos = np.stack([ix, iy], 1).astype(float)
        d = (pos - c) * o.zooms[:2]
        half_lr = max(np.abs(d[:, lr_axis]).max(), 1.0) + 0.5 * o.zooms[lr_axis]
        half_ap = max(np.abs(d[:, ap_axis]).max(), 1.0) + 0.5 * o.zooms[ap_axis]
        fx = (ix[:, None, None] + sub[None, :, None] - c[0]) * o.zooms[0]
        fy = (iy[:, None, None] + sub[None, None, :] - c[1]) * o.zooms[1]
        lr = fx if lr_axis == 0 else fy
        ap = (fy if lr_axis == 0 else fx) * ap_sign
        u, v = np.abs(lr / half_lr), ap / half_ap
        bar = (np.abs(v + 0.02) < 0.12) & (u < 0.42)
        centre = (u < 0.16) & (np.abs(v) < 0.22)
        ant = ((u - 0.3) / 0.2) ** 2 + ((v - 0.3) / 0.32) ** 2 <= 1.0
        # posterior horns: thin ellipses leaning outwards
        th = np.deg2rad(28.0)
        pu, pv = u - 0.24, v + 0.48
        a1 = (np.cos(th) * pu - np.sin(th) * pv) / 0.09
        a2 = (np.sin(th) * pu + np.cos(th) * pv) / 0.42
        post = a1 ** 2 + a2 ** 2 <= 1.0
        share = (bar | centre | ant | post).mean(axis=(1, 2))
        out[ix, iy, k] *= (1.0 + (factor - 1.0) * share).astype(np.float32)
        gm_total += share.sum()
        cord_total += len(ix)
    return o.back(out), float(gm_total / max(cord_total, 1))


# ------------------------------------------------------------------------------------------ building sets


def _erode_inplane(mask, axis):
    m = np.moveaxis(np.asarray(mask) > 0, axis, -1)
    er = np.stack([ndi.binary_erosion(m[:, :, k]) for k in range(m.shape[2])], -1)
    return np.moveaxis(er, -1, axis)


def cord_mask(bg: Background, data: Path, out: Path) -> np.ndarray:
    """The reference cord mask, or cordseg's own (cached) eroded by one in-plane voxel; nothing below
    `bg.cord_from`."""
    mask = _cord_mask(bg, data, out)
    if bg.cord_from is not None:
        mask = mask.copy()
        mask[:, :, :bg.cord_from] = False
    return mask


def _cord_mask(bg: Background, data: Path, out: Path) -> np.ndarray:
    if bg.cord:
        return np.asarray(nib.load(str(data / bg.cord)).dataobj) > 0.5
    cache = out / "cords" / (Path(bg.image).name.replace(".nii.gz", "") + "_cordseg.nii.gz")
    if not cache.is_file():
        import cordseg
        from cordseg.io import save_like

        cache.parent.mkdir(parents=True, exist_ok=True)
        seg = cordseg.segment_cord(str(data / bg.image), contrast=bg.contrast)
        save_like(np.asarray(seg.dataobj), nib.load(str(data / bg.image)), cache)
    img = nib.load(str(data / bg.image))
    from nibabel.orientations import aff2axcodes

    axis = [i for i, c in enumerate(aff2axcodes(img.affine)) if c in ("S", "I")][0]
    return _erode_inplane(np.asarray(nib.load(str(cache)).dataobj) > 0, axis)


def background_image(bg: Background, data: Path, out: Path):
    """(nibabel image of the background, cord mask, gm info or None). GM variants are drawn here."""
    img = nib.load(str(data / bg.image))
    cord = cord_mask(bg, data, out)
    if not bg.gm_of:
        return img, cord, None
    from cordseg.io import image_like

    factor = float(np.random.default_rng([7, bg.gm_seed]).uniform(1.05, 1.15))
    new, share = gm_butterfly(img, cord, factor)
    return image_like(new.astype(np.float32), img), cord, dict(factor=round(factor, 4), gm_share=round(share, 3))


def _suffix(contrast):
    return "T2star" if contrast == "t2s" else "T2w"


def build(set_name: str, data: Path = DEFAULT_DATA, out: Path = DEFAULT_OUT, force=False, log=print) -> Path:
    """Build one set (cached): returns the path of its cases.json."""
    from cordseg.io import save_like

    seed, procedure, per_bg = SETS[set_name]
    folder = out / set_name
    index = folder / "cases.json"
    if index.is_file() and not force:
        return index
    folder.mkdir(parents=True, exist_ok=True)
    plan = []  # (background, k)
    for bg in BACKGROUNDS:
        plan += [(bg, k) for k in range(per_bg)]
    counts = np.random.default_rng([seed, 0]).integers(COUNT[0], COUNT[1] + 1, len(plan))
    total = int(counts.sum())
    bands = np.array([0] * ((total + 1) // 2) + [1] * (total // 2))
    np.random.default_rng([seed, 1]).shuffle(bands)
    starts = np.concatenate([[0], np.cumsum(counts)])
    cases, bg_cache = [], {}
    for i, (bg, k) in enumerate(plan):
        if bg.name not in bg_cache:
            bg_cache[bg.name] = background_image(bg, data, out)
        img, cord, gm = bg_cache[bg.name]
        rng = np.random.default_rng([seed, 100 + i])
        new, labels, truths = insert(img, cord, rng, procedure, list(bands[starts[i]:starts[i + 1]]))
        cid = f"{set_name}_{i:02d}_{bg.name}"
        image_path = folder / f"{cid}_{_suffix(bg.contrast)}.nii.gz"
        label_path = folder / f"{cid}_lesions.nii.gz"
        save_like(new, img, image_path, dtype=np.float32)
        save_like(labels, img, label_path, dtype=np.int16)
        case = dict(case=cid, set=set_name, kind="lesion", procedure=procedure, seed=[seed, 100 + i],
                    background=bg.name, source=bg.image, subject=bg.subject, never_seen=never_seen(bg.subject),
                    contrast=bg.contrast, image=str(image_path), labels=str(label_path),
                    cord_mask="reference" if bg.cord else "cordseg, eroded 1 in-plane voxel",
                    zooms=[float(z) for z in img.header.get_zooms()[:3]], gm=gm,
                    lesions=[asdict(t) for t in truths])
        (folder / f"{cid}.json").write_text(json.dumps(case, indent=1))
        cases.append(case)
        log(f"{cid}: {len(truths)} lesions, " + ", ".join(f"{t.volume_mm3:.0f} mm3 x{t.ratio:.2f}" for t in truths))
    for bg in BACKGROUNDS:  # lesion-free: the unmodified scans and the GM-bright variants
        cid = f"{set_name}_free_{bg.name}"
        if bg.gm_of:
            img, _, gm = bg_cache.get(bg.name) or background_image(bg, data, out)
            path = folder / f"{cid}_{_suffix(bg.contrast)}.nii.gz"
            save_like(np.asarray(img.dataobj, np.float32), img, path, dtype=np.float32)
        else:
            path, gm = data / bg.image, None
        cases.append(dict(case=cid, set=set_name, kind="free", background=bg.name, source=bg.image,
                          subject=bg.subject, never_seen=never_seen(bg.subject), contrast=bg.contrast,
                          image=str(path), labels=None, gm=gm, lesions=[]))
    cases.append(dict(case=f"{set_name}_ms", set=set_name, kind="ms", background="t2_ms_axial", source=MS_SCAN[0],
                      subject="ms", never_seen=True, contrast=MS_SCAN[1], image=str(data / MS_SCAN[0]),
                      labels=None, gm=None, lesions=[]))
    index.write_text(json.dumps(dict(set=set_name, seed=seed, procedure=procedure, cases=cases), indent=1))
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or rebuild with --force) one set")
    b.add_argument("--set", choices=sorted(SETS), required=True)
    b.add_argument("--data", type=Path, default=DEFAULT_DATA)
    b.add_argument("--out", type=Path, default=DEFAULT_OUT)
    b.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", RuntimeWarning)
    index = build(a.set, a.data, a.out, a.force)
    cases = json.loads(index.read_text())["cases"]
    les = [x for c in cases for x in c["lesions"]]
    if les:
        r = np.array([x["ratio"] for x in les])
        v = np.array([x["volume_mm3"] for x in les])
        print(f"{index}: {sum(c['kind'] == 'lesion' for c in cases)} lesion cases, {len(les)} lesions; ratio "
              f"{r.min():.2f}-{r.max():.2f} ({(r < 1.4).sum()} below 1.4); volume {v.min():.0f}-{v.max():.0f} mm3 "
              f"(<20: {(v < 20).sum()}, 20-100: {((v >= 20) & (v <= 100)).sum()}, >100: {(v > 100).sum()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
