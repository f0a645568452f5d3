"""Cord morphometry: cross-sectional area (CSA) and shape per axial slice, and their means.

    from cordseg.morphometry import morphometry, mean_csa
    table = morphometry("t2_seg.nii.gz")                   # mean over the whole cord
    table = morphometry(seg, slices=(10, 30))              # over RPI slices 10..30 (inclusive)
    table = morphometry(seg, levels="t2_levels.nii.gz")    # one row per vertebral level
    table = morphometry(seg, perslice=True); table.to_csv("csa.csv")
    mean_csa("t2_seg.nii.gz")                              # one number, mm2

Method (docs/morphometry.md says why):
- The mask is reoriented to RPI (flips and transposes only), so slices are [:, :, z] with z counted
  inferior -> superior ("Slice (I->S)"), whatever the order of the stored array.
- A centerline is fitted to the per-slice centres of mass (largest component of the slice's voxels >= 0.5)
  by local quadratic regression in mm (tricube weights over +-max(20 mm, 3.5 slices)); its derivative gives
  the unit tangent t = (tx, ty, tz) on every slice.
- A locally straight cord crossed by an axial plane leaves a cut that is the oblique projection of its
  perpendicular cross-section: projecting the cut along t onto the plane perpendicular to t is a linear map
  M (2x2, det M = tz = cos of the angle between cord and slice normal). So the perpendicular section's
  area is the cut's area times tz, and its second-moment matrix is M C M^T.
- area = sum(mask values) x pixel area x tz, from the voxel values as they are (no resampling), so soft
  masks give partial-volume areas. Shape comes from the slice's mask >= 0.5 after bilinear upsampling to
  <= 0.1 mm pixels (as the toolbox measures it): diameters = axis lengths (4 sqrt(eigenvalue)) of the
  ellipse with the section's second moments M C M^T; the axis nearer the left-right direction is
  diameter_RL, the other diameter_AP; eccentricity = sqrt(1 - l2/l1); orientation = angle (deg, 0..90)
  between the major axis and left-right; solidity = area / convex-hull area (a linear map leaves it
  unchanged). angle_AP = atan2(tx, tz), angle_RL = atan2(ty, tz) (deg, the toolbox's definitions);
  length = slice thickness / tz.
- Slices whose mask (>= 0.5) has more than one 8-connected component, touches the edge of the slice, or is
  empty between cord slices are flagged; means and SDs leave them out and say how many were left out.
"""
from __future__ import annotations

import csv
import io as _io
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .errors import CordsegWarning, InputError, OutputError
from .io import img_name, load_image, nifti_stem, same_grid, write_bytes_atomic
from .orientation import to_rpi

__all__ = [
    "METRICS", "COLUMNS", "SliceMetrics", "MorphometryTable", "morphometry", "mean_csa", "write_csv",
    "csv_path_beside", "parse_range", "tube_phantom",
]

# per-slice metrics, in the toolbox's column order
METRICS = ("area", "angle_AP", "angle_RL", "diameter_AP", "diameter_RL", "eccentricity", "orientation",
           "solidity")
COLUMNS = (["Timestamp", "cordseg Version", "Filename", "Slice (I->S)", "VertLevel", "DistancePMJ"]
           + [f"{k}({m})" for m in METRICS for k in ("MEAN", "STD")]
           + ["SUM(length)", "N slices", "Excluded slices", "Flags"])

BANDWIDTH_MM = 20.0  # half-width of the local centerline fit; a few slices more on thick-slice scans
MASK_TOL = 1e-3  # values this far outside 0..1 (interpolation round-off) are clipped, not refused
SHAPE_PIXEL_MM = 0.1  # pixel of the upsampled mask that shape is measured on
DISC_MAX_VOXELS = 30  # a label value with at most this many voxels is a disc point, not a level


@dataclass
class SliceMetrics:
    """One axial slice of the RPI grid. Lengths mm, areas mm2, angles degrees; nan where undefined."""

    slice: int
    area: float
    angle_AP: float
    angle_RL: float
    diameter_AP: float
    diameter_RL: float
    eccentricity: float
    orientation: float
    solidity: float
    length: float
    components: int
    touches_edge: bool
    level: int | None = None
    flags: tuple = ()

    @property
    def ok(self) -> bool:
        return not self.flags


@dataclass
class MorphometryTable:
    """The per-slice metrics of one mask and the rows asked for (per slice, per level or one mean).

    rows: dicts keyed by COLUMNS (values already formatted as the CSV holds them, numbers as floats);
    slices: every cord slice (first to last slice holding mask voxels >= 0.5), flagged ones included."""

    filename: str
    slices: list
    rows: list
    soft: bool
    zooms: tuple
    columns: tuple = tuple(COLUMNS)
    notes: list = field(default_factory=list)

    def to_csv(self, path) -> Path:
        return write_csv(self.rows, path, self.columns)

    @property
    def mean_area(self) -> float:
        """Mean CSA (mm2) over the unflagged slices that the rows cover: the rows' MEAN(area) weighted by their
        slice counts, so a per-slice or per-level table gives the same mean as its one-row summary."""
        pairs = [(float(r["MEAN(area)"]), int(r["N slices"])) for r in self.rows if r.get("N slices")]
        pairs = [(a, n) for a, n in pairs if np.isfinite(a)]
        total = sum(n for _, n in pairs)
        return sum(a * n for a, n in pairs) / total if total else float("nan")

    def text(self) -> str:
        """A short aligned table of the rows for a terminal."""
        cols = ["Slice (I->S)", "VertLevel", "MEAN(area)", "STD(area)", "MEAN(diameter_AP)",
                "MEAN(diameter_RL)", "MEAN(angle_AP)", "MEAN(angle_RL)", "SUM(length)", "N slices", "Flags"]
        short = {"Slice (I->S)": "slices", "VertLevel": "level", "MEAN(area)": "area_mm2", "STD(area)": "sd",
                 "MEAN(diameter_AP)": "AP_mm", "MEAN(diameter_RL)": "RL_mm", "MEAN(angle_AP)": "angAP",
                 "MEAN(angle_RL)": "angRL", "SUM(length)": "length_mm", "N slices": "n", "Flags": "flags"}
        body = [[_fmt(r[c], 2) for c in cols] for r in self.rows]
        head = [short[c] for c in cols]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
        return "\n".join(lines)


# --------------------------------------------------------------------------- public entry points


def morphometry(seg_img, image=None, *, perslice: bool = False, slices=None, levels=None, vert=None,
                perlevel: bool | None = None, levels_kind: str = "auto", angle_correction: bool = True,
                bandwidth_mm: float = BANDWIDTH_MM) -> MorphometryTable:
    """CSA and shape of the cord in `seg_img` (path or nibabel image; binary 0/1 or soft 0..1 mask).

    image: the image the mask was made from (optional): named in the table and checked to share the mask's
    grid (a warning when not). perslice: one row per slice instead of means. slices: (first, last) or
    "first:last", RPI slice indices (inferior -> superior), both included. levels: a label image of
    vertebral levels (an integer level per voxel, e.g. 2 = C2) or of discs (single points, value n at the
    disc above vertebra n, as the toolbox's disc labels): each slice gets a VertLevel. vert: (lo, hi) or
    "lo:hi", levels to keep. perlevel: one row per level (default: True when levels are given and vert is
    not). Means and SDs (population SD, as the toolbox) leave flagged slices out.
    """
    seg = load_image(seg_img)
    name = str(seg_img) if isinstance(seg_img, (str, Path)) else img_name(seg)
    if seg.ndim != 3:
        raise InputError(f"{name}: a cord mask must be a 3D image, not shape {seg.shape}.")
    rpi = to_rpi(seg)
    data = _checked_mask(rpi.data, name)
    soft = bool(np.any((data > MASK_TOL) & (data < 1 - MASK_TOL)))
    zooms = tuple(float(z) for z in rpi.zooms)

    image_name = None
    if image is not None:
        im = load_image(image)
        image_name = str(image) if isinstance(image, (str, Path)) else img_name(im)
        if not same_grid(im.affine, im.shape[:3], seg.affine, seg.shape[:3]):
            warnings.warn(f"{name} is not on the grid of {image_name}; slices are counted on the mask's grid",
                          CordsegWarning, stacklevel=2)

    metrics = _slice_metrics(data, zooms, soft, angle_correction, bandwidth_mm)
    first, last = metrics[0].slice, metrics[-1].slice

    if levels is not None:
        slice_levels = _levels_per_slice(levels, levels_kind, rpi, data, [m.slice for m in metrics])
        for m in metrics:
            m.level = slice_levels.get(m.slice)
    elif vert is not None:
        raise InputError("vert (a range of vertebral levels) needs a levels image (levels=...).")

    chosen = metrics
    if slices is not None:
        lo, hi = parse_range(slices, "slice range", rpi.shape[2] - 1)
        chosen = [m for m in chosen if lo <= m.slice <= hi]
        if not chosen:
            raise InputError(f"slice range {lo}:{hi} holds no cord: the mask spans slices {first}:{last} "
                             "(RPI, inferior to superior).")
    if vert is not None:
        vlo, vhi = parse_range(vert, "vertebral level range")
        chosen = [m for m in chosen if m.level is not None and vlo <= m.level <= vhi]
        if not chosen:
            found = sorted({m.level for m in metrics if m.level is not None})
            raise InputError(f"no cord slice has a vertebral level in {vlo}:{vhi} (levels found on the cord: "
                             f"{', '.join(map(str, found)) or 'none'}).")
    if perlevel is None:
        perlevel = levels is not None and vert is None

    stamp = datetime.now().isoformat(timespec="seconds")
    base = {"Timestamp": stamp, "cordseg Version": _version(), "Filename": image_name or name, "DistancePMJ": ""}
    if perslice:
        rows = [_slice_row(base, m) for m in chosen]
    elif perlevel and levels is not None:
        by_level = {}
        for m in chosen:
            if m.level is not None:
                by_level.setdefault(m.level, []).append(m)
        if not by_level:
            raise InputError("no cord slice received a vertebral level from the levels image.")
        rows = [_mean_row(base, group, str(lv)) for lv, group in sorted(by_level.items())]
    else:
        lvls = sorted({m.level for m in chosen if m.level is not None})
        vl = "" if not lvls else (str(lvls[0]) if len(lvls) == 1 else f"{lvls[0]}:{lvls[-1]}")
        rows = [_mean_row(base, chosen, vl)]
    notes = []
    if levels is not None:
        unlevelled = [m.slice for m in chosen if m.level is None]
        if unlevelled:
            notes.append(f"{len(unlevelled)} cord slice(s) got no vertebral level from the levels image "
                         f"(slices {_spans(unlevelled)})" + ("; they are in no per-level row" if perlevel and
                                                            not perslice else ""))
    flagged = [m for m in chosen if m.flags]
    if flagged:
        notes.append(f"{len(flagged)} slice(s) flagged and left out of the means: "
                     + ", ".join(f"{m.slice} ({'/'.join(m.flags)})" for m in flagged[:12])
                     + (" ..." if len(flagged) > 12 else ""))
    return MorphometryTable(filename=name, slices=metrics, rows=rows, soft=soft, zooms=zooms, notes=notes)


def mean_csa(seg_img, *, slices=None) -> float:
    """Mean angle-corrected CSA (mm2) of a cord mask over its unflagged slices (or RPI `slices` lo:hi);
    nan when every slice is flagged. For a results table beside a segmentation."""
    return morphometry(seg_img, slices=slices).mean_area


def csv_path_beside(mask_path, suffix: str = "_csa") -> Path:
    """Where a per-slice table goes beside a mask: <stem><suffix>.csv in the mask's folder."""
    mask_path = Path(mask_path)
    return mask_path.with_name(nifti_stem(mask_path) + suffix + ".csv")


def write_csv(rows, path, columns=COLUMNS) -> Path:
    """Write rows (dicts keyed by `columns`) as CSV, atomically (temporary file beside it, then rename)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a CSV file name.")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: the output folder {folder} does not exist.")
    buf = _io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c, ""), 6) for c in columns])
    return write_bytes_atomic(buf.getvalue().encode("utf-8"), path)


def parse_range(value, what: str = "range", upper: int | None = None) -> tuple:
    """(lo, hi) from "lo:hi", "n", (lo, hi) or n; whole numbers, lo <= hi, 0 <= lo and hi <= upper."""
    try:
        if isinstance(value, str):
            parts = value.strip().split(":")
            if len(parts) == 1:
                parts = parts * 2
            if len(parts) != 2:
                raise ValueError
            lo, hi = (float(p) for p in parts)
        elif np.ndim(value) == 0:
            lo = hi = float(value)
        else:
            lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must look like A:B (two whole numbers), not {value!r}.") from None
    if not (lo.is_integer() and hi.is_integer()):
        raise InputError(f"{what} must be whole numbers, not {value!r}.")
    lo, hi = int(lo), int(hi)
    if lo > hi:
        raise InputError(f"{what} {lo}:{hi} is reversed; give the lower bound first.")
    if lo < 0 or (upper is not None and hi > upper):
        bound = f"0:{upper}" if upper is not None else "numbers >= 0"
        raise InputError(f"{what} {lo}:{hi} is outside the image ({bound}).")
    return lo, hi


# --------------------------------------------------------------------------- per-slice metrics


def _checked_mask(data: np.ndarray, name: str) -> np.ndarray:
    lo, hi = float(data.min()), float(data.max())
    if lo < -MASK_TOL or hi > 1 + MASK_TOL:
        raise InputError(f"{name}: not a cord mask (values range {lo:g}..{hi:g}; a binary 0/1 or a soft 0..1 "
                         "mask is expected).")
    if not np.any(data >= 0.5):
        raise InputError(f"{name}: the cord mask is empty (no voxel >= 0.5).")
    return np.clip(data, 0.0, 1.0, out=data)


def _slice_metrics(data, zooms, soft, angle_correction, bandwidth_mm) -> list:
    sx, sy, sz = zooms
    nx, ny, nz = data.shape
    binary = data >= 0.5
    present = binary.any(axis=(0, 1))
    zs = np.flatnonzero(present)
    z_all = np.arange(zs[0], zs[-1] + 1)

    eight = np.ones((3, 3), bool)
    info = {}
    for z in zs:
        b = binary[:, :, z]
        lab, n = ndi.label(b, structure=eight)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            main = lab == (1 + int(np.argmax(sizes)))
        else:
            main = b
        ii, jj = np.nonzero(main)
        edge = bool(b[0, :].any() or b[-1, :].any() or b[:, 0].any() or b[:, -1].any())
        info[z] = (n, edge, ii.mean() * sx, jj.mean() * sy)

    # centerline: local quadratic fit to the centres (edge-cut slices left out while others remain)
    zc = np.array(zs, float) * sz
    xc = np.array([info[z][2] for z in zs])
    yc = np.array([info[z][3] for z in zs])
    weight = np.array([0.0 if info[z][1] else 1.0 for z in zs])
    if weight.sum() < 2:
        weight = np.ones(len(zs))
    if angle_correction:
        dxdz, dydz = _local_slopes(zc, xc, yc, weight, max(bandwidth_mm, 3.5 * sz))
    else:
        dxdz = dydz = np.zeros(len(zs))
    slope = {z: (dxdz[i], dydz[i]) for i, z in enumerate(zs)}

    out = []
    for z in z_all:
        if z not in info:
            out.append(SliceMetrics(int(z), *([float("nan")] * 9), components=0, touches_edge=False,
                                    flags=("empty",)))
            continue
        n, edge, _, _ = info[z]
        tx, ty = slope[z]
        t = np.array([tx, ty, 1.0])
        t /= np.linalg.norm(t)
        values = data[:, :, z]
        metrics = _one_slice(values, binary[:, :, z], zooms, t)
        flags = []
        if n > 1:
            flags.append("several_components")
        if edge:
            flags.append("touches_edge")
        out.append(SliceMetrics(int(z), **metrics, components=int(n), touches_edge=edge, flags=tuple(flags)))
    return out


def _local_slopes(z, x, y, weight, h):
    """dx/dz and dy/dz at every z of a local quadratic (tricube-weighted) regression of half-width h."""
    n = len(z)
    dx, dy = np.zeros(n), np.zeros(n)
    for i, z0 in enumerate(z):
        d = z - z0
        w = np.clip(1 - np.abs(d / h) ** 3, 0, None) ** 3 * weight
        use = w > 0
        k = int(use.sum())
        if k < 2:
            continue
        deg = min(2, k - 1)
        a = np.vander(d[use], deg + 1, increasing=True) * np.sqrt(w[use])[:, None]
        rhs = np.stack([x[use], y[use]], axis=1) * np.sqrt(w[use])[:, None]
        coef, *_ = np.linalg.lstsq(a, rhs, rcond=None)
        dx[i], dy[i] = coef[1]
    return dx, dy


def _section_map(t: np.ndarray) -> np.ndarray:
    """2x2 map from axial-plane offsets (mm) to coordinates in the plane perpendicular to t.

    The basis is the image's (left, anterior) pair turned by the smallest rotation that takes the slice
    normal onto t, so no twist is added; det = t_z."""
    ez = np.array([0.0, 0.0, 1.0])
    k = np.cross(ez, t)
    s, c = np.linalg.norm(k), float(t[2])
    if s < 1e-12:
        return np.eye(2)
    k /= s
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + s * kx + (1 - c) * kx @ kx
    return rot[:2, :2].T  # rows: the rotated left and anterior axes, their x and y components


def _one_slice(values, b, zooms, t) -> dict:
    sx, sy, sz = zooms
    tz = float(t[2])
    tan_xy = np.array([t[0], t[1]]) / tz
    # a soft mask on a thick tilted slice spreads the cut by sz*tan; keep that spread in the sum
    pad_mm = 0.5 * sz * float(np.hypot(*tan_xy)) + 2 * max(sx, sy)
    ii, jj = np.nonzero(b)
    pi, pj = int(math.ceil(pad_mm / sx)) + 1, int(math.ceil(pad_mm / sy)) + 1
    i0, i1 = max(ii.min() - pi, 0), min(ii.max() + pi + 1, b.shape[0])
    j0, j1 = max(jj.min() - pj, 0), min(jj.max() + pj + 1, b.shape[1])
    crop = values[i0:i1, j0:j1].astype(np.float64)

    area_cut = crop.sum() * sx * sy
    fine, fx, fy = _upsampled(crop, sx, sy)
    if not fine.any():  # only reachable for a soft speck that interpolation drops
        fine, fx, fy = crop >= 0.5, 1, 1
    # shape from the mask (>= 0.5) on a <= 0.1 mm grid, as the toolbox measures it: for soft masks the
    # 0.5 line of the interpolated values, which sits on the boundary for partial-volume values
    fi, fj = np.nonzero(fine)
    px, py = sx / fx, sy / fy
    pts = np.stack([fi * px, fj * py], axis=1)
    pts -= pts.mean(axis=0)
    cov = pts.T @ pts / len(pts) + np.diag([px * px / 12.0, py * py / 12.0])
    m = _section_map(t)
    sec = m @ cov @ m.T
    evals, evecs = np.linalg.eigh(sec)
    l2, l1 = np.clip(evals, 0.0, None)
    major_dir = evecs[:, 1]
    orientation = math.degrees(math.atan2(abs(major_dir[1]), abs(major_dir[0])))  # 0 = left-right
    major, minor = 4.0 * math.sqrt(l1), 4.0 * math.sqrt(l2)
    d_rl, d_ap = (major, minor) if orientation <= 45 else (minor, major)
    return dict(
        area=area_cut * tz,
        angle_AP=math.degrees(math.atan2(t[0], tz)),
        angle_RL=math.degrees(math.atan2(t[1], tz)),
        diameter_AP=d_ap,
        diameter_RL=d_rl,
        eccentricity=math.sqrt(max(0.0, 1.0 - l2 / l1)) if l1 > 0 else 0.0,
        orientation=orientation,
        solidity=_solidity(fine),
        length=sz / tz,
    )


def _upsampled(crop, sx, sy):
    """The crop bilinearly upsampled to <= 0.1 mm pixels (at most 10x per axis), thresholded at 0.5."""
    fx = max(1, min(10, int(math.ceil(sx / SHAPE_PIXEL_MM))))
    fy = max(1, min(10, int(math.ceil(sy / SHAPE_PIXEL_MM))))
    ci = (np.arange(crop.shape[0] * fx) + 0.5) / fx - 0.5
    cj = (np.arange(crop.shape[1] * fy) + 0.5) / fy - 0.5
    # separable: along i then along j (cheaper than map_coordinates on the whole fine grid)
    rows = ndi.map_coordinates(crop, np.meshgrid(ci, np.arange(crop.shape[1]), indexing="ij"), order=1,
                               mode="constant")
    fine = ndi.map_coordinates(rows, np.meshgrid(np.arange(ci.size), cj, indexing="ij"), order=1,
                               mode="constant")
    return fine >= 0.5, fx, fy


def _solidity(fine) -> float:
    """Area over convex-hull area of a (fine) mask; a linear map of the plane leaves it unchanged."""
    from scipy.spatial import ConvexHull, QhullError

    if not fine.any():
        return float("nan")
    edge = fine & ~ndi.binary_erosion(fine)
    pi, pj = np.nonzero(edge)
    corners = np.concatenate([np.stack([pi + a, pj + c], 1) for a in (-0.5, 0.5) for c in (-0.5, 0.5)])
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return float("nan")
    return float(min(1.0, fine.sum() / hull.volume))


# --------------------------------------------------------------------------- vertebral levels


def _levels_per_slice(levels, kind, rpi, data, cord_slices) -> dict:
    lev = load_image(levels)
    lname = str(levels) if isinstance(levels, (str, Path)) else img_name(lev)
    if lev.ndim != 3:
        raise InputError(f"{lname}: a levels image must be 3D, not shape {lev.shape}.")
    ldata = np.asarray(lev.dataobj)
    if ldata.min() < 0 or not np.allclose(ldata, np.rint(ldata), atol=1e-3):
        raise InputError(f"{lname}: not a label image (levels must be whole numbers >= 0).")
    ldata = np.rint(ldata).astype(np.int64)
    values, counts = np.unique(ldata[ldata > 0], return_counts=True)
    if values.size == 0:
        raise InputError(f"{lname}: the levels image has no label.")
    if kind == "auto":
        kind = "discs" if counts.max() <= DISC_MAX_VOXELS else "levels"
    if kind not in ("levels", "discs"):
        raise ValueError(f"levels_kind must be 'auto', 'levels' or 'discs', not {kind!r}")
    to_lev = np.linalg.inv(np.asarray(lev.affine, float)) @ rpi.affine  # RPI voxel -> label voxel
    out = {}
    if kind == "discs":
        to_rpi_vox = np.linalg.inv(rpi.affine) @ np.asarray(lev.affine, float)
        disc_z = {}
        for v in values:
            idx = np.argwhere(ldata == v).mean(axis=0)
            disc_z[int(v)] = float(nib.affines.apply_affine(to_rpi_vox, idx)[2])
        ordered = sorted(disc_z.items())
        for (v1, z1), (v2, z2) in zip(ordered, ordered[1:]):
            if z2 >= z1:
                raise InputError(f"{lname}: disc {v2} is not below disc {v1}; disc labels must increase from "
                                 "head to feet (3 = C2/C3 disc, 4 = C3/C4, ...).")
        # vertebra n lies between disc n (above) and disc n + 1 (below); outside the labelled discs: no level
        for z in cord_slices:
            above = [(zd, v) for v, zd in ordered if zd > z]
            below = [(zd, v) for v, zd in ordered if zd <= z]
            if above and below:
                out[z] = min(above)[1]
        return out
    shape = ldata.shape
    for z in cord_slices:
        b = data[:, :, z] >= 0.5
        ii, jj = np.nonzero(b)
        label = _mode_at(ldata, shape, to_lev, ii, jj, z)
        if label is None:  # levels drawn on the spine, not the cord: the slice's own labels
            ii, jj = np.nonzero(np.ones(b.shape, bool))
            label = _mode_at(ldata, shape, to_lev, ii, jj, z)
        if label is not None:
            out[z] = label
    return out


def _mode_at(ldata, shape, to_lev, ii, jj, z):
    if ii.size == 0:
        return None
    pts = np.stack([ii, jj, np.full(ii.shape, z)], axis=1).astype(float)
    q = np.rint(nib.affines.apply_affine(to_lev, pts)).astype(np.int64)
    inside = np.all((q >= 0) & (q < np.array(shape)), axis=1)
    if not inside.any():
        return None
    labels = ldata[q[inside, 0], q[inside, 1], q[inside, 2]]
    labels = labels[labels > 0]
    if labels.size == 0:
        return None
    vals, cnt = np.unique(labels, return_counts=True)
    return int(vals[np.argmax(cnt)])


# --------------------------------------------------------------------------- rows


def _slice_row(base, m: SliceMetrics) -> dict:
    row = dict(base)
    row["Slice (I->S)"] = str(m.slice)
    row["VertLevel"] = "" if m.level is None else str(m.level)
    for k in METRICS:
        row[f"MEAN({k})"] = getattr(m, k)
        row[f"STD({k})"] = ""
    row["SUM(length)"] = m.length
    row["N slices"] = 0 if m.flags else 1
    row["Excluded slices"] = 1 if m.flags else 0
    row["Flags"] = ";".join(m.flags)
    return row


def _mean_row(base, group, vertlevel: str) -> dict:
    row = dict(base)
    zs = [m.slice for m in group]
    row["Slice (I->S)"] = f"{min(zs)}:{max(zs)}"
    row["VertLevel"] = vertlevel
    used = [m for m in group if m.ok]
    for k in METRICS:
        v = np.array([getattr(m, k) for m in used], float)
        v = v[np.isfinite(v)]  # (a solidity qhull could not measure)
        row[f"MEAN({k})"] = float(v.mean()) if v.size else float("nan")
        row[f"STD({k})"] = float(v.std()) if v.size else float("nan")
    row["SUM(length)"] = float(sum(m.length for m in used)) if used else float("nan")
    row["N slices"] = len(used)
    row["Excluded slices"] = len(group) - len(used)
    flags = sorted({f for m in group for f in m.flags})
    row["Flags"] = ";".join(flags)
    return row


def _spans(zs) -> str:
    """[1, 2, 3, 7] -> "1:3, 7"."""
    out, start = [], zs[0]
    for a, b in zip(zs, zs[1:] + [None]):
        if b is None or b != a + 1:
            out.append(str(start) if start == a else f"{start}:{a}")
            start = b
    return ", ".join(out)


def _fmt(v, digits: int) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.{digits}f}"
    return str(v)


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------- synthetic cords


def tube_phantom(shape, affine, *, semi_axes=(4.0, 3.0), centre=(0.0, 0.0, 0.0), tilt_deg=0.0, azimuth_deg=0.0,
                 curvature_radius=None, twist_deg=0.0, soft=False, supersample=None):
    """A cord of known cross-section on any grid: (mask image, true perpendicular area in mm2).

    The cord is an elliptical tube in scanner coordinates (RAS, mm) with semi-axes (a, b) in mm: a in the
    vertical plane of the lean, b horizontal and perpendicular to that plane; twist_deg turns the ellipse in
    its own plane. Its axis passes through `centre` leaning `tilt_deg` from the superior direction towards
    the horizontal direction `azimuth_deg` (0 = towards +x, 90 = towards +y). Straight when
    curvature_radius is None; otherwise a circular arc of that radius in the same vertical plane, leaning
    more the higher it goes (sin(lean) = sin(tilt) + (z - centre z) / radius). Its perpendicular section is
    always the same ellipse, area pi*a*b. Each voxel's value is its inside fraction from `supersample`
    points per axis (default: one every 0.15 mm, 5 to 9, odd); soft=False keeps the voxels at least half
    inside.
    """
    shape = tuple(int(n) for n in shape)
    affine = np.asarray(affine, float)
    a, b = (float(v) for v in semi_axes)
    az, tilt, tw = (math.radians(v) for v in (azimuth_deg, tilt_deg, twist_deg))
    horiz = np.array([math.cos(az), math.sin(az), 0.0])
    up = np.array([0.0, 0.0, 1.0])
    binorm = np.cross(up, horiz)  # horizontal, perpendicular to the plane of the lean
    c0 = np.asarray(centre, float)

    def local(p):
        """(u, v): coordinates in the tube's cross-section for points p (n, 3)."""
        if curvature_radius is None:
            # axis along sin(tilt)*horiz + cos(tilt)*up; n1 lies in the lean plane, perpendicular to it
            n1 = math.cos(tilt) * horiz - math.sin(tilt) * up
            q = p - c0
            u, v = q @ n1, q @ binorm
        else:
            r = float(curvature_radius)
            # arc: vertical plane through c0 spanned by horiz and up, centre of curvature at c0 + r*horiz
            # rotated back by the starting lean
            cc = c0 + r * (math.cos(tilt) * horiz - math.sin(tilt) * up)
            q = p - cc
            qh, qu = q @ horiz, q @ up
            rho = np.hypot(qh, qu)
            u, v = r - rho, q @ binorm  # u > 0 towards the centre of curvature (along horiz at the start)
        cu, su = math.cos(tw), math.sin(tw)
        return cu * u + su * v, -su * u + cu * v

    # which voxels can hold boundary: the section's gauge is 1/min(a, b)-Lipschitz
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    pts = nib.affines.apply_affine(affine, idx)
    u, v = local(pts)
    g = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    half_diag = 0.5 * float(np.linalg.norm(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    margin = half_diag / min(a, b)
    frac = (g <= 1.0).astype(np.float64)
    near = np.flatnonzero(np.abs(g - 1.0) <= margin)
    if supersample is None:
        vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        # odd counts: a fraction is never exactly one half, so ">= 0.5" has no ties to favour
        supersample = tuple(min(9, max(5, int(math.ceil(v / 0.15)))) | 1 for v in vox)
    if near.size:
        offs = [(np.arange(k) + 0.5) / k - 0.5 for k in supersample]
        grid = np.stack(np.meshgrid(*offs, indexing="ij"), -1).reshape(-1, 3)
        step = max(1, 2 ** 18 // len(grid))
        for start in range(0, near.size, step):
            chunk = near[start:start + step]
            sub = (idx[chunk][:, None, :] + grid[None, :, :]).reshape(-1, 3)
            su_, sv_ = local(nib.affines.apply_affine(affine, sub))
            inside = ((su_ / a) ** 2 + (sv_ / b) ** 2 <= 1.0).reshape(len(chunk), -1)
            frac[chunk] = inside.mean(axis=1)
    frac = frac.reshape(shape)
    arr = frac.astype(np.float32) if soft else (frac >= 0.5).astype(np.uint8)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img, math.pi * a * b


class _CallableModule(type(math)):
    """`cordseg.morphometry` is this module once anything imports it (Python sets the attribute on the
    package), so the module itself answers a call as the function of the same name: cordseg.morphometry(seg)
    works whichever of the two the package attribute is."""

    def __call__(self, *args, **kwargs):
        return morphometry(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
