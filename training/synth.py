"""Synthetic training images made from label maps (domain randomisation, in the manner of SynthSeg).

Every sample starts from the PAM50 template's label maps (cord white and grey matter, CSF, vertebrae) at
0.5 mm, moved by a random rigid + scaling + bending + elastic transform, surrounded by random background
"clutter" (smooth regions, blobs, a body outline with air outside). Each label gets a random intensity
(half of the time drawn from T1-, T2- or T2*-like ranges), then bias field, texture, slice-thickness and
in-plane resolution simulation, blur, noise and a gamma change. The cord labels are the targets; lesions can
be inserted into the cord for the lesion model.

Working space is the runtime's: axis 0 left-right, axis 1 posterior-anterior, axis 2 inferior-superior.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

# Anatomy label values in the label volume.
BG, WM, GM, CSF, BONE = 0, 1, 2, 3, 4
ROOTS = 5  # cauda equina: nerve roots in the dural sac below the conus (not cord)
CLUTTER0 = 10  # clutter labels start here
BLOB0 = 40  # blob labels start here
MAX_LABEL = 64

ANATOMY_ZOOM = 0.5  # mm, PAM50 grid


@dataclass
class Anatomy:
    """PAM50 label volume in working space, with the cord's centre on every slice."""

    labels: np.ndarray  # uint8 (nx, ny, nz)
    center: np.ndarray  # float32 (nz, 2): cord centre in voxels, NaN where no cord
    cord_z: tuple  # first and last slice with cord
    # Manual masks stop where their scan's field of view stopped, not where the cord does: such an anatomy
    # repeats its end slices along z, and never stands for "no cord here".
    extend_z: bool = False

    @classmethod
    def from_pam50(cls, folder, *, cauda_equina=False, root_seed=0) -> "Anatomy":
        """The PAM50 template's labels. It stops at the conus: below it there is bone only, no dural sac.
        `cauda_equina` adds one (see add_cauda_equina; "bundle" for its clumped roots), so that a model
        learns where the cord ends on lumbar scans instead of taking the nerve roots in the sac for cord;
        `root_seed` draws the roots' course (for "bundle": where the clump gathers)."""
        folder = Path(folder)

        def load(name):
            return _load_las(folder / f"PAM50_{name}.nii.gz")[0]

        cord = load("cord") > 0
        gm = load("gm") > 0.5
        csf = load("csf") > 0
        spine = load("spine") > 0
        labels = np.zeros(cord.shape, np.uint8)
        labels[spine] = BONE
        labels[csf] = CSF
        labels[cord] = WM
        labels[cord & gm] = GM
        if cauda_equina:
            labels = add_cauda_equina(labels, bundle=cauda_equina == "bundle", seed=root_seed)
        return cls._with_centres(labels)

    @classmethod
    def from_masks(cls, cord_path, csf_path=None, *, csf_ring_mm=2.0, margin_mm=30.0) -> "Anatomy":
        """From a manual cord mask (and CSF mask) of a real scan, resampled to 0.5 mm isotropic.

        Thick axial slices are interpolated along z through signed distance maps, so the outline changes
        smoothly between them. Without a CSF mask, a ring of `csf_ring_mm` around the cord stands in for it.
        """
        cord, zooms = _load_las(cord_path)
        cord = cord > 0.5
        if csf_path is not None:
            csf = _load_las(csf_path)[0] > 0.5
        else:
            canal = ndi.distance_transform_edt(~cord, sampling=zooms[:2].tolist() + [1e6]) <= csf_ring_mm
            csf = canal & ~cord
        zs = np.where(cord.any((0, 1)))[0]
        cord, csf = cord[:, :, zs[0]:zs[-1] + 1], csf[:, :, zs[0]:zs[-1] + 1]
        # crop in-plane around the cord, keeping a background border (so edge repetition stays background)
        xs, ys = np.nonzero(cord.any(2))
        m = int(np.ceil(margin_mm / zooms[0]))
        box = (slice(max(xs.min() - m, 0), xs.max() + m + 1), slice(max(ys.min() - m, 0), ys.max() + m + 1))
        cord, csf = cord[box], csf[box]
        cord_fine = _resample_mask(cord, zooms, ANATOMY_ZOOM)
        canal_fine = _resample_mask(cord | csf, zooms, ANATOMY_ZOOM)
        labels = np.zeros(cord_fine.shape, np.uint8)
        labels[canal_fine] = CSF
        labels[cord_fine] = WM
        labels = np.pad(labels, ((1, 1), (1, 1), (0, 0)))
        return cls._with_centres(labels, extend_z=True)

    @classmethod
    def _with_centres(cls, labels, extend_z=False) -> "Anatomy":
        cord = np.isin(labels, (WM, GM))
        center = np.full((labels.shape[2], 2), np.nan, np.float32)
        zs = np.where(cord.any((0, 1)))[0]
        for z in zs:
            xs, ys = np.nonzero(cord[:, :, z])
            center[z] = xs.mean(), ys.mean()
        if extend_z:  # slices without cord inside the range take their neighbours' centre
            good = ~np.isnan(center[:, 0])
            for k in range(2):
                center[:, k] = np.interp(np.arange(len(center)), np.where(good)[0], center[good, k])
        return cls(labels, center, (int(zs[0]), int(zs[-1])), extend_z)

    @classmethod
    def load(cls, source) -> "Anatomy":
        """From the PAM50 folder, or from an .npz written by `save` (no nibabel needed)."""
        source = Path(source)
        if source.suffix == ".npz":
            d = np.load(source)
            return cls(d["labels"], d["center"], tuple(int(v) for v in d["cord_z"]),
                       bool(d["extend_z"]) if "extend_z" in d else False)
        return cls.from_pam50(source)

    def save(self, path) -> None:
        np.savez_compressed(path, labels=self.labels, center=self.center, cord_z=np.array(self.cord_z),
                            extend_z=np.array(self.extend_z))


def _load_las(path):
    """A label map's voxels in working space (nibabel's RAS flipped to LAS), and its zooms in mm."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj)[::-1], np.asarray(img.header.get_zooms()[:3], float)


# Subjects whose images are used for validation here: their masks never become training anatomies.
HELD_OUT_SUBJECTS = ("sub-unf01",)


def add_cauda_equina(labels, *, below_mm=60.0, n_roots=16, seed=0, bundle=False):
    """PAM50 labels extended `below_mm` under the template, with a CSF-filled dural sac from the conus down
    and nerve roots (label ROOTS) leaving the conus and running down the sac, plus the filum terminale.

    The vertebrae below the template mirror its lowest ones. Roots look like cord tissue on most contrasts;
    what tells them apart is shape: a few thin strands in CSF instead of one round cord.

    bundle: the look of a real lumbar scan instead (t2_lumbar here: CNN1 took its roots for cord down to the
    sac's floor): 40 roots, leaving the conus over the 60 mm above its tip, gathered into one clump about a
    centimetre across in the back half of the sac, so that on an axial slice they make a cord-sized, mottled
    blob of dark dots with CSF between them."""
    rng = np.random.default_rng(seed)
    if bundle:
        n_roots = 40
    pad = int(round(below_mm / ANATOMY_ZOOM))
    bone = np.where(labels[:, :, pad - 1::-1] == BONE, BONE, BG).astype(np.uint8)
    out = np.concatenate([bone, labels], axis=2)
    cord = np.isin(out, (WM, GM))
    zc = np.where(cord.any((0, 1)))[0]
    csf_z = np.where((out == CSF).any((0, 1)))[0]
    ref = csf_z[0] + 6
    sac = (out[:, :, ref] == CSF) | np.isin(out[:, :, ref], (WM, GM))
    sac = ndi.binary_closing(sac, iterations=3)
    for z in range(ref):
        s = out[:, :, z]
        s[sac & (s == BG)] = CSF
    # roots: strands from points on the conus's surface (tip to 40 mm above it) down to the sac's floor
    inner = ndi.binary_erosion(sac, iterations=2)
    floor = np.argwhere(inner)
    # lying supine, the roots settle against the back of the sac (y points anterior): most go to its
    # dorsal third, where on axial slices they clump into a dark band or blob, the cord's look-alike
    dorsal = floor[floor[:, 1] <= np.percentile(floor[:, 1], 33)]
    if bundle:  # one clump: the roots' ends scatter ~2.5 mm around a point in the back half of the sac
        back = floor[floor[:, 1] <= np.percentile(floor[:, 1], 50)]
        clump = back[rng.integers(len(back))].astype(float)
        ends = clump + rng.normal(0.0, 2.5 / ANATOMY_ZOOM, (n_roots, 2))
        ends = np.array([floor[np.argmin(((floor - e) ** 2).sum(1))] for e in ends], float)  # inside the sac
    tip = zc[0]
    xx, yy = np.meshgrid(np.arange(out.shape[0]), np.arange(out.shape[1]), indexing="ij")
    for k in range(n_roots + 1):
        filum = k == n_roots
        z0 = tip if filum else min(int(tip + rng.uniform(0, (60.0 if bundle else 40.0) / ANATOMY_ZOOM)),
                                   out.shape[2] - 1)
        pts = np.argwhere(cord[:, :, z0])
        if filum or len(pts) == 0:
            start = np.argwhere(cord[:, :, tip]).mean(0)
        else:
            start = pts[rng.integers(len(pts))].astype(float)
        pool = dorsal if rng.random() < 0.85 else floor
        if filum:
            end = start
        elif bundle:
            end = ends[k]
        else:
            end = pool[rng.integers(len(pool))].astype(float)
        radius = (0.4 if filum else rng.uniform(0.5, 1.0) if bundle else rng.uniform(0.4, 0.9)) / ANATOMY_ZOOM
        for z in range(z0, -1, -1):
            t = (z0 - z) / max(z0, 1)
            cx, cy = start + (end - start) * min(1.0, 3.0 * t)  # they fan out within ~20 mm, then run straight
            disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
            s = out[:, :, z]
            s[disk & (s == CSF)] = ROOTS
    return out


ROOT_VARIANTS = 4  # cauda_equina="bundles": the template this many times, each with its own clump of roots


def _pam50(folder, cauda_equina) -> list:
    if cauda_equina == "bundles":  # one clump geometry alone is learnt by heart; real sacs differ
        return [Anatomy.from_pam50(folder, cauda_equina="bundle", root_seed=k) for k in range(ROOT_VARIANTS)]
    return [Anatomy.from_pam50(folder, cauda_equina=cauda_equina)]


def load_anatomies(source, *, cauda_equina=False) -> list:
    """Every training anatomy under `source`, PAM50 first (several PAM50 copies with `cauda_equina`
    "bundles", each with its roots clumped elsewhere).

    `source`: the PAM50 folder; a label-map folder holding `PAM50/` and optionally `spinegeneric/` (manual
    cord and CSF masks, `*_seg-manual` / `*_csfseg-manual`); an .npz of one anatomy (`Anatomy.save`); or a
    folder of such .npz files (the first in name order must be PAM50).
    """
    source = Path(source)
    if source.suffix == ".npz":
        return [Anatomy.load(source)]
    if (source / "PAM50_cord.nii.gz").exists():
        return _pam50(source, cauda_equina)
    npz = sorted(source.glob("*.npz"))
    if npz:
        return [Anatomy.load(f) for f in npz]
    if not (source / "PAM50").is_dir():
        raise FileNotFoundError(f"no PAM50 label maps in {source}")
    return _pam50(source / "PAM50", cauda_equina) + mask_anatomies(source)


def mask_anatomies(labelmaps, *, held_out: bool = False) -> list:
    """Anatomies from the manual cord (and CSF) masks in `labelmaps/spinegeneric`: the training subjects', or
    with `held_out` those of HELD_OUT_SUBJECTS (validation only)."""
    out = []
    for cord in sorted((Path(labelmaps) / "spinegeneric").glob("*_seg-manual.nii.gz")):
        subject, acq = cord.name.split("_")[:2]
        if (subject in HELD_OUT_SUBJECTS) != held_out or acq == "T1w":  # T1w masks repeat the T2w one
            continue
        csf = cord.with_name(cord.name.replace("_seg-manual", "_csfseg-manual"))
        out.append(Anatomy.from_masks(cord, csf if csf.exists() else None))
    return out


def _resample_mask(mask, zooms, new_zoom):
    """A binary mask onto an isotropic grid of `new_zoom` mm: in-plane signed distances, linear along z."""
    sdf = np.empty(mask.shape, np.float32)
    for z in range(mask.shape[2]):
        m = mask[:, :, z]
        if not m.any():
            sdf[:, :, z] = 1e3
            continue
        sdf[:, :, z] = (ndi.distance_transform_edt(~m, sampling=zooms[:2]) -
                        ndi.distance_transform_edt(m, sampling=zooms[:2]))
    shape = [max(1, int(round(n * zm / new_zoom))) for n, zm in zip(mask.shape, zooms)]
    coords = [np.clip((np.arange(n) + 0.5) * new_zoom / zm - 0.5, 0, old - 1)
              for n, zm, old in zip(shape, zooms, mask.shape)]
    grid = np.meshgrid(*coords, indexing="ij")
    return ndi.map_coordinates(sdf, grid, order=1, mode="nearest") < 0


# ----------------------------------------------------------------------------------------------------
# geometry


def _rotation(rng, max_tilt_deg, max_inplane_deg):
    ax, ay = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg, 2))
    az = np.deg2rad(rng.uniform(-max_inplane_deg, max_inplane_deg))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _upsample_matrix(n, c):
    """(n, c) weights that interpolate c control points onto n samples with a smoothstep kernel."""
    pos = (np.arange(n) + 0.5) * c / n - 0.5
    pos = np.clip(pos, 0, c - 1)
    lo = np.minimum(np.floor(pos).astype(int), c - 2) if c > 1 else np.zeros(n, int)
    t = pos - lo
    t = t * t * (3 - 2 * t)
    w = np.zeros((n, c), np.float32)
    w[np.arange(n), lo] = 1 - t
    if c > 1:
        w[np.arange(n), lo + 1] += t
    return w


def _smooth_field(rng, shape, coarse, amplitude):
    """Random smooth field: coarse Gaussian noise interpolated separably onto `shape` (fast)."""
    coarse = tuple(max(2, int(c)) for c in coarse)
    field = rng.normal(0.0, amplitude, coarse).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, coarse)):
        field = np.moveaxis(np.tensordot(_upsample_matrix(n, c), field, axes=(1, axis)), 0, axis)
    return field


def sample_label_grid(anatomy, rng, shape, spacing, center_z, *, offset_mm=(0.0, 0.0), max_tilt=20.0,
                      max_inplane=20.0, scale_range=(0.8, 1.25), elastic_mm=1.5, bend_mm=4.0):
    """Labels of a randomly transformed anatomy on a grid of `shape` voxels at `spacing` mm.

    The grid is centred on the cord at template slice `center_z` (plus `offset_mm` in-plane); template
    points outside the label volume are background. Returns uint8 labels.
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, np.float64)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)],
                                indexing="ij"), axis=-1).reshape(-1, 3)
    grid[:, 0] -= offset_mm[0]
    grid[:, 1] -= offset_mm[1]
    # Bending: in-plane shift that varies smoothly (quadratically) along the grid's z axis.
    zc = grid[:, 2] / max(1.0, shape[2] * spacing[2] / 2.0)
    bend = rng.uniform(-bend_mm, bend_mm, 2)
    grid[:, 0] += bend[0] * zc**2
    grid[:, 1] += bend[1] * zc**2
    rot = _rotation(rng, max_tilt, max_inplane)
    scale_xy = rng.uniform(*scale_range)
    scale = np.array([scale_xy * rng.uniform(0.9, 1.1), scale_xy * rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)])
    src = (grid @ rot.T) / scale  # mm in template space relative to the centre
    if elastic_mm > 0:
        coarse = [max(2, int(n * s / 12.0)) for n, s in zip(shape, spacing)]
        for axis in range(3):
            src[:, axis] += _smooth_field(rng, shape, coarse, elastic_mm).reshape(-1)
    cz = int(np.clip(center_z, anatomy.cord_z[0], anatomy.cord_z[1]))
    cx, cy = anatomy.center[cz]
    vox = src / ANATOMY_ZOOM + np.array([cx, cy, center_z])
    labels = ndi.map_coordinates(anatomy.labels, vox.T, order=0, mode="nearest" if anatomy.extend_z else "constant",
                                 cval=BG, prefilter=False)
    return labels.reshape(shape)


def add_clutter(labels, rng, spacing, *, n_blobs=(0, 12), blob_radius_mm=(1.5, 12.0), protect=(WM, GM)):
    """Fill background with random smooth regions and add blobs (never over `protect` labels)."""
    shape = labels.shape
    n_regions = rng.integers(2, 8)
    coarse = [max(2, int(n * s / rng.uniform(8.0, 40.0))) for n, s in zip(shape, spacing)]
    field = _smooth_field(rng, shape, coarse, 1.0)
    edges = np.quantile(field, np.sort(rng.uniform(0, 1, n_regions - 1)))
    clutter = (CLUTTER0 + np.digitize(field, edges)).astype(np.uint8)
    out = np.where(labels == BG, clutter, labels)
    keep = np.isin(labels, protect)
    nb = rng.integers(n_blobs[0], n_blobs[1] + 1)
    if nb:
        axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
        half = np.array([n * s / 2.0 for n, s in zip(shape, spacing)])
        for i in range(nb):
            c = rng.uniform(-half, half)
            r = rng.uniform(*blob_radius_mm, 3)
            r[2] *= rng.uniform(1.0, 4.0)  # blobs are often elongated along the body axis
            d = sum(((a - ci) / ri) ** 2 for a, ci, ri in zip(np.ix_(*axes), c, r))
            blob = (d <= 1.0) & ~keep
            out[blob] = BLOB0 + (i % (MAX_LABEL - BLOB0))
    return out


# ----------------------------------------------------------------------------------------------------
# lesions

def insert_lesions(labels, rng, spacing, *, count=(0, 4), volume_mm3=(5.0, 1700.0)):
    """Irregular blobs inside the cord; returns a soft lesion map (0..1) clipped to the cord."""
    cord = np.isin(labels, (WM, GM))
    soft = np.zeros(labels.shape, np.float32)
    n = rng.integers(count[0], count[1] + 1)
    if n == 0 or not cord.any():
        return soft
    idx = np.argwhere(cord)
    vox_mm3 = float(np.prod(spacing))
    for _ in range(n):
        vol = np.exp(rng.uniform(np.log(volume_mm3[0]), np.log(volume_mm3[1])))
        centre = idx[rng.integers(len(idx))]
        # a few overlapping ellipsoids, elongated along the cord
        base_r = (3.0 * vol / (4.0 * np.pi)) ** (1.0 / 3.0)
        half = np.ceil(np.array([base_r * 2.5] * 3) / np.asarray(spacing)).astype(int) + 1
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, labels.shape)
        axes = [(np.arange(l, h) - c) * s for l, h, c, s in zip(lo, hi, centre, spacing)]
        blob = np.zeros(tuple(hi - lo), bool)
        for _k in range(rng.integers(1, 4)):
            r = base_r * rng.uniform(0.5, 1.0, 3) * np.array([1.0, 1.0, rng.uniform(1.0, 3.0)])
            c = rng.normal(0, base_r * 0.4, 3)
            d = sum(((a - ci) / ri) ** 2 for a, ci, ri in zip(np.ix_(*axes), c, r))
            blob |= d <= 1.0
        region = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        blob &= cord[region]
        if blob.sum() * vox_mm3 < 2.0:
            continue
        edge = ndi.gaussian_filter(blob.astype(np.float32), rng.uniform(0.3, 1.0))
        soft[region] = np.maximum(soft[region], np.where(cord[region], edge, 0.0))
    return soft


# ----------------------------------------------------------------------------------------------------
# intensities

CONTRAST_PRIORS = {
    # (lo, hi) intensity ranges: WM, GM, CSF, BONE; lesion relative to cord (multiplier range)
    "t2": {WM: (0.25, 0.45), GM: (0.3, 0.5), CSF: (0.75, 1.0), BONE: (0.05, 0.35), "lesion": (1.4, 2.2)},
    "t2s": {WM: (0.25, 0.45), GM: (0.45, 0.7), CSF: (0.7, 1.0), BONE: (0.05, 0.3), "lesion": (1.3, 2.0)},
    "t1": {WM: (0.5, 0.8), GM: (0.45, 0.75), CSF: (0.02, 0.2), BONE: (0.3, 0.9), "lesion": (0.5, 0.8)},
    # proton-density / MT-weighted gradient echo: the CSF only somewhat darker than a mid-grey cord that
    # matches the tissue around it (the full-field MTS scans here)
    "gre": {WM: (0.35, 0.6), GM: (0.35, 0.65), CSF: (0.1, 0.45), BONE: (0.25, 0.7), "lesion": (1.3, 2.0)},
}
# Mean diffusion-weighted images (cord models only, not among the lesion families): the cord is the brightest
# tissue; the CSF (fast diffusion), fat-suppressed and short-T2 tissue around it fall to a dark, noisy floor.
DWI_PRIOR = {WM: (0.6, 1.0), GM: (0.6, 1.0), CSF: (0.02, 0.25), BONE: (0.02, 0.3), "other": (0.02, 0.4)}


def synth_intensity(labels, rng, spacing, *, lesion=None, contrast=None, air=None, lesion_contrast=1.0,
                    gm_bright=0.0, dwi=False):
    """Random-contrast image of a label volume. `contrast` picks a prior family or None for any.

    `lesion_contrast` below 1 makes some lesions fainter: their difference from the cord is scaled by a
    factor drawn from [lesion_contrast, 1]. `gm_bright`: on T2*-like and gradient-echo contrasts, the share
    of images whose grey matter is made 1.05-1.35 times brighter than the white matter (as on real T2* and
    MT scans, where it is what a lesion model mistakes for lesions)."""
    means = rng.uniform(0.0, 1.0, MAX_LABEL + 1).astype(np.float32)
    family = contrast if contrast is not None else (rng.choice(list(CONTRAST_PRIORS)) if rng.random() < 0.5 else None)
    lesion_gain = rng.uniform(1.3, 2.2) if rng.random() < 0.5 else rng.uniform(0.4, 0.75)
    if family is not None:
        prior = CONTRAST_PRIORS[family]
        for lab in (WM, GM, CSF, BONE):
            means[lab] = rng.uniform(*prior[lab])
        lesion_gain = rng.uniform(*prior["lesion"])
    if lesion_contrast < 1.0:  # drawn only then, so that the shipped recipe's random stream is unchanged
        lesion_gain = 1.0 + (lesion_gain - 1.0) * rng.uniform(lesion_contrast, 1.0)
    if dwi:  # drawn only then, so that the other recipes' random streams are unchanged
        means[:] = rng.uniform(*DWI_PRIOR["other"], MAX_LABEL + 1)
        for lab in (WM, GM, CSF, BONE):
            means[lab] = rng.uniform(*DWI_PRIOR[lab])
    if rng.random() < 0.5:  # often grey and white matter are not distinguishable
        means[GM] = means[WM]
    if gm_bright and family in ("t2s", "gre") and rng.random() < gm_bright:  # drawn only then (stream kept)
        means[GM] = means[WM] * rng.uniform(1.05, 1.35)
    means[ROOTS] = 0.5 * (means[WM] + means[ROOTS])  # nerve roots: near the cord's brightness (no new draw)
    # The cord must differ from the CSF around it, or there is nothing to see; but only a little on some
    # scans (full-field gradient echo), so the smallest gap allowed varies.
    min_gap = rng.uniform(0.06, 0.15)
    if abs(means[WM] - means[CSF]) < min_gap and not dwi:
        means[CSF] = np.clip(means[WM] + np.sign(rng.random() - 0.5) * rng.uniform(min_gap, 0.5), 0, 1)
    image = means[labels]
    # texture: smooth per-voxel multiplicative variation
    coarse = [max(2, int(n * s / 4.0)) for n, s in zip(labels.shape, spacing)]
    image *= 1.0 + _smooth_field(rng, labels.shape, coarse, rng.uniform(0.0, 0.08))
    if lesion is not None and lesion.any():
        cord_level = 0.5 * (means[WM] + means[GM])
        target = np.clip(cord_level * lesion_gain, 0.0, 1.5)
        image = image * (1.0 - lesion) + target * lesion
    if air is not None:
        image[air] = rng.uniform(0.0, 0.05)
    # bias field
    coarse = [2, 2, 2]
    image *= np.exp(_smooth_field(rng, labels.shape, coarse, rng.uniform(0.0, 0.3)))
    return image.astype(np.float32)


def degrade(image, rng, spacing, *, thickness_mm=None, inplane_mm=None, slice_axis=2):
    """Simulate acquisition: in-plane resolution, slice thickness, noise, gamma.

    `slice_axis` is the axis the slices were stacked along: 2 for axial acquisitions, 0 for sagittal ones
    (thick left-right), whose in-plane resolution then applies to the other two axes.
    """
    spacing = np.asarray(spacing, float)
    sigma = [0.0, 0.0, 0.0]
    inplane_axes = [a for a in range(3) if a != slice_axis]
    if inplane_mm is not None and inplane_mm > spacing[inplane_axes[0]]:
        for a in inplane_axes:
            sigma[a] = np.sqrt(max(inplane_mm**2 - spacing[a] ** 2, 0.0)) / 2.355 / spacing[a]
    sigma = [s + rng.uniform(0, 0.4) for s in sigma]
    image = ndi.gaussian_filter(image, sigma, mode="nearest")
    if thickness_mm is not None and thickness_mm > spacing[slice_axis] * 1.01 and image.shape[slice_axis] > 1:
        image = np.moveaxis(_thick_slices(np.moveaxis(image, slice_axis, 2), spacing[slice_axis], thickness_mm,
                                          rng), 2, slice_axis)
    noise = rng.uniform(0.0, 0.08)
    if rng.random() < 0.5:  # Rician-like magnitude noise
        image = np.sqrt((image + rng.normal(0, noise, image.shape)) ** 2 + rng.normal(0, noise, image.shape) ** 2)
    else:
        image = image + rng.normal(0, noise, image.shape)
    image = np.clip(image, 0, None)
    gamma = np.exp(rng.normal(0, 0.25))
    peak = np.percentile(image, 99.5) + 1e-6
    image = (image / peak) ** gamma * peak
    return image.astype(np.float32)


def _linear_matrix(positions, n):
    """(len(positions), n) weights of linear interpolation at fractional indices (edge-clamped)."""
    pos = np.clip(np.asarray(positions, float), 0, n - 1)
    lo = np.minimum(np.floor(pos).astype(int), max(n - 2, 0))
    t = pos - lo
    w = np.zeros((len(pos), n), np.float32)
    w[np.arange(len(pos)), lo] = 1 - t
    if n > 1:
        w[np.arange(len(pos)), lo + 1] += t
    return w


def _thick_slices(image, dz, thickness, rng):
    """Average over slabs of `thickness` mm, sample every `thickness` mm, interpolate back linearly."""
    nz = image.shape[2]
    k = thickness / dz
    box = max(1, int(round(k)))
    slab = ndi.uniform_filter1d(image, box, axis=2, mode="nearest")
    start = rng.uniform(0, k)
    src = np.arange(start, nz, k)
    if len(src) < 2:
        return np.repeat(slab[:, :, [nz // 2]], nz, axis=2)
    sampled = slab @ _linear_matrix(src, nz).T
    back = _linear_matrix((np.arange(nz) - start) / k, len(src))
    return sampled @ back.T


def body_air_mask(shape, spacing, rng):
    """Air outside an elliptical body outline (None half of the time or when the outline is off-grid)."""
    if rng.random() < 0.5:
        return None
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape[:2], spacing[:2])]
    c = rng.uniform(-20, 20, 2)
    r = rng.uniform(35, 120, 2)
    d = ((axes[0][:, None] - c[0]) / r[0]) ** 2 + ((axes[1][None, :] - c[1] - r[1] * 0.3) / r[1]) ** 2
    air2d = d > 1.0
    if not air2d.any():
        return None
    return np.repeat(air2d[:, :, None], shape[2], axis=2)


# ----------------------------------------------------------------------------------------------------
# samples for each network

def _template_z(anatomy, rng, p_outside, p_conus=0.0):
    lo, hi = anatomy.cord_z
    # around where the cord ends: 50 mm below the conus's tip (the dural sac, if modelled) to 60 mm above
    if p_conus and not anatomy.extend_z and rng.random() < p_conus:
        return float(rng.uniform(lo - 100, lo + 120))
    # above the medulla (brain-like, no cord) or below the conus
    if rng.random() < p_outside and not anatomy.extend_z:
        return float(rng.choice([rng.uniform(hi + 10, hi + 120), rng.uniform(-60, lo - 6)]))
    return float(rng.uniform(lo, hi))


def heatmap_sample(anatomy, rng, *, size=96, zoom=1.0, p_outside=0.12, p_sagittal=0.25, p_conus=0.0):
    """One 2D slice for CNN1: (image (size, size), cord target (size, size)) at `zoom` mm in-plane.

    A share `p_outside` of the slices lies above the medulla or below the conus (no cord); a share
    `p_conus` lies within 50-60 mm of the conus's tip; a share `p_sagittal` comes from sagittal
    acquisitions (thick left-right, fine along the cord)."""
    thickness = float(np.exp(rng.uniform(np.log(0.5), np.log(6.0))))
    inplane = rng.uniform(0.5, 1.3)
    sagittal = rng.random() < p_sagittal
    fine = ANATOMY_ZOOM
    nz = max(1, int(round((inplane if sagittal else thickness) / fine)))
    up = int(round(zoom / fine))
    shape = (size * up, size * up, nz)
    spacing = (fine, fine, fine)
    offset = rng.uniform(-0.35, 0.35, 2) * size * zoom
    z = _template_z(anatomy, rng, p_outside, p_conus)
    labels = sample_label_grid(anatomy, rng, shape, spacing, z, offset_mm=offset, max_tilt=25.0,
                               max_inplane=25.0, elastic_mm=1.0, bend_mm=0.0)
    if rng.random() < 0.5:
        labels = labels[::-1]
    cord = np.isin(labels, (WM, GM))
    labels = add_clutter(labels, rng, spacing)
    air = body_air_mask(shape, spacing, rng)
    image = synth_intensity(labels, rng, spacing, air=air)
    if sagittal:
        image = degrade(image, rng, spacing, inplane_mm=inplane, thickness_mm=thickness, slice_axis=0)
    else:
        image = degrade(image, rng, spacing, inplane_mm=inplane)
    # the slab along z (axial thickness, or sagittal in-plane resolution): average, then pool in-plane
    image = image.mean(axis=2).reshape(size, up, size, up).mean(axis=(1, 3))
    target = cord.mean(axis=2).reshape(size, up, size, up).mean(axis=(1, 3)) >= 0.5
    return image.astype(np.float32), target.astype(np.float32)


@dataclass(frozen=True)
class LesionStyle:
    """How patch_sample draws lesions (and slice thickness) for the lesion task."""
    volume_mm3: tuple = (5.0, 1700.0)  # log-uniform
    contrast: float = 1.0  # below 1: fainter lesions too (synth_intensity's lesion_contrast)
    p_free: float = 0.15  # share of lesion-free patches
    max_axial_thickness_mm: float = 6.0  # above 6: 30% of axial patches get slices of 6 mm to this
    gm_bright: float = 0.0  # share of T2*/gradient-echo patches with grey matter brighter than white
    shading: float = 0.0  # share of patches with strong smooth shading along the cord (ends 2-3x off)


LESION_STYLES = {
    "shipped": LesionStyle(),
    # The misses of the shipped model are small (< 20 mm3) and faint (lesion/cord < 1.5) lesions, and its
    # false lesion sits in the bright grey matter of a scan with 17 mm slices: more of all three.
    "faint": LesionStyle(volume_mm3=(3.0, 800.0), contrast=0.4, p_free=0.25, max_axial_thickness_mm=17.0),
    # What produced false lesions and misses on unseen scans: bright grey matter (T2*, MT), coil shading that
    # brightens or darkens the end slices 2-3x, 5-17 mm slices, lesions down to 1.1x the cord; lesion-free
    # patches carry all of it too.
    "hard": LesionStyle(volume_mm3=(2.0, 600.0), contrast=0.25, p_free=0.3, max_axial_thickness_mm=17.0,
                        gm_bright=0.6, shading=0.35),
}


def shade_along(image, rng, axis=2):
    """Multiply by a smooth profile along `axis` whose ends differ 2-3x (brighter or darker) from its middle."""
    n = image.shape[axis]
    t = np.linspace(-1.0, 1.0, n)
    ends = np.log(rng.uniform(2.0, 3.0)) * rng.choice([-1.0, 1.0], 2)
    centre = rng.uniform(-0.3, 0.3)
    prof = np.where(t < centre, ends[0] * ((centre - t) / (1 + centre)) ** 2,
                    ends[1] * ((t - centre) / (1 - centre)) ** 2)
    shape = [1, 1, 1]
    shape[axis] = n
    return (image * np.exp(prof).reshape(shape)).astype(np.float32)


def patch_sample(anatomy, rng, *, shape=(64, 64, 48), spacing=(0.5, 0.5, 1.0), lesions=False,
                 center_sigma_mm=1.5, p_sagittal=0.25, style: LesionStyle = LESION_STYLES["shipped"], p_dwi=0.0,
                 p_conus=0.0):
    """One 3D patch for CNN2 centred near the cord: (image, cord target, lesion target).

    A share `p_sagittal` is acquired sagittally (thick slices left-right), the rest axially. A share `p_dwi`
    (cord patches only) looks like a mean diffusion-weighted image: DWI_PRIOR's contrast, axial slices of
    3-17.5 mm, 0.8-2 mm in plane, more noise. A share `p_conus` is centred within 50-60 mm of the conus's tip
    (with an anatomy that has the dural sac and roots below it: there the cord target is empty)."""
    fine = np.array([spacing[0], spacing[1], min(spacing[2], ANATOMY_ZOOM)])
    zup = int(round(spacing[2] / fine[2]))
    fshape = (shape[0], shape[1], shape[2] * zup)
    z = _template_z(anatomy, rng, 0.0, p_conus)
    offset = rng.normal(0, center_sigma_mm, 2)
    labels = sample_label_grid(anatomy, rng, fshape, fine, z, offset_mm=offset, max_tilt=20.0, max_inplane=20.0)
    if rng.random() < 0.5:
        labels = labels[::-1]
    cord = np.isin(labels, (WM, GM))
    lesion = None
    if lesions and rng.random() < 1.0 - style.p_free:
        lesion = insert_lesions(labels, rng, fine, count=(1, 5), volume_mm3=style.volume_mm3)
    labels = add_clutter(labels, rng, fine, n_blobs=(0, 6), blob_radius_mm=(1.0, 6.0))
    contrast = None
    if lesions:  # lesion contrast follows a plausible T1/T2/T2* family
        contrast = str(rng.choice(list(CONTRAST_PRIORS)))
    dwi = bool(p_dwi) and not lesions and rng.random() < p_dwi  # drawn only then (other streams kept)
    image = synth_intensity(labels, rng, fine, lesion=lesion, contrast=contrast, lesion_contrast=style.contrast,
                            gm_bright=style.gm_bright, dwi=dwi)
    if style.shading and rng.random() < style.shading:
        from cordseg.segmentation import level_slices  # what the runtime leaves of the shading

        image = level_slices(shade_along(image, rng))
    thickness = float(np.exp(rng.uniform(np.log(0.5), np.log(6.0))))
    slice_axis = 0 if rng.random() < p_sagittal else 2
    if style.max_axial_thickness_mm > 6.0 and slice_axis == 2 and rng.random() < 0.3:
        thickness = float(rng.uniform(6.0, style.max_axial_thickness_mm))
    inplane = rng.uniform(0.5, 1.2)
    if dwi:  # echo-planar diffusion: coarse in plane, thick axial slices, low signal-to-noise
        thickness, slice_axis, inplane = float(rng.uniform(3.0, 17.5)), 2, float(rng.uniform(0.8, 2.0))
        image = image + rng.normal(0, rng.uniform(0.02, 0.1), image.shape).astype(np.float32)
    image = degrade(image, rng, fine, thickness_mm=thickness, inplane_mm=inplane, slice_axis=slice_axis)

    def pool(a):
        return a.reshape(shape[0], shape[1], shape[2], zup).mean(axis=3)

    image = pool(image)
    cord_t = (pool(cord.astype(np.float32)) >= 0.5).astype(np.float32)
    if lesion is None:
        lesion_t = np.zeros(shape, np.float32)
    else:
        lesion_t = (pool(lesion) >= 0.5).astype(np.float32)
    return image.astype(np.float32), cord_t, lesion_t
