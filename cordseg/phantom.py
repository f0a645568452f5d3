"""Synthetic spinal-cord phantoms with a known answer, for tests and benchmarks.

A curved elliptical tube of cord inside a CSF ring, in a noisy tissue
background with a few distant bright and dark blobs. Everything is built on
the RPI working grid (nibabel codes L, A, S; `shape` and `zooms` describe that
grid, `cord_slices` and `gap_slices` count its z axis) and then flipped and
transposed into the native orientation that `axcodes` asks for, with the
affine that makes `cordseg.orientation.to_rpi` give the RPI arrays back exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

__all__ = ["Phantom", "make_phantom"]

# Cord cross-section semi-axes (left-right, antero-posterior) and CSF ring width, in mm.
CORD_RADII = (4.0, 3.0)
CSF_WIDTH = 2.0
LESION_RADII = (1.5, 1.5, 2.5)  # mm, x y z

# Intensities before noise: background tissue, CSF, cord, lesion.
_CONTRASTS = {
    "t2": dict(tissue=0.35, csf=1.0, cord=0.55, lesion=0.85),
    "t1": dict(tissue=0.45, csf=0.10, cord=0.75, lesion=0.40),
}


@dataclass(frozen=True, eq=False)
class Phantom:
    """image: float32 NIfTI in the native orientation; cord, lesions: uint8 masks on its grid;
    centerline: (n, 3) native voxel coordinates, one row per cord slice (RPI z ascending);
    centerline_rpi: the same points in RPI voxel coordinates; cord_slices: RPI z range of the cord."""

    image: nib.Nifti1Image
    cord: nib.Nifti1Image
    lesions: nib.Nifti1Image
    centerline: np.ndarray
    centerline_rpi: np.ndarray
    cord_slices: range
    n_lesions: int


def make_phantom(
    shape=(64, 64, 40),
    zooms=(1.0, 1.0, 1.0),
    *,
    axcodes=("L", "A", "S"),
    curvature: float = 6.0,
    noise: float = 0.05,
    n_lesions: int = 0,
    gap_slices=(),
    cord_slices=None,
    contrast: str = "t2",
    blobs: int = 4,
    seed: int = 0,
) -> Phantom:
    """Build a phantom.

    shape, zooms: the RPI grid (voxels, mm). axcodes: native orientation (any
    of the 48 nibabel axis-code triples). curvature: peak left-right bow of
    the centerline in mm (the antero-posterior S-bend is half of it), reduced
    if the field of view is too small. noise: Gaussian noise sd (CSF = 1 in t2).
    n_lesions: lesions inside the cord, separated along z (ValueError if they
    do not fit). gap_slices: RPI z indices whose signal drops out (the masks
    and centerline still hold the cord there). cord_slices: range (or
    (start, stop)) of RPI z slices holding cord; the others hold tissue only,
    like brain above or below the conus. contrast: "t2" (CSF bright, cord grey)
    or "t1" (CSF dark, cord brighter than tissue). blobs: distant distractors.
    """
    shape = tuple(int(n) for n in shape)
    zooms = tuple(float(z) for z in zooms)
    if len(shape) != 3 or len(zooms) != 3 or min(shape) < 1 or min(zooms) <= 0:
        raise ValueError(f"need a positive 3D shape and zooms, got {shape}, {zooms}")
    if contrast not in _CONTRASTS:
        raise ValueError(f"contrast must be one of {sorted(_CONTRASTS)}, not {contrast!r}")
    levels = _CONTRASTS[contrast]
    nx, ny, nz = shape
    sx, sy, sz = zooms
    rng = np.random.default_rng(seed)

    cord_slices = _as_range(cord_slices, nz)
    gap = np.zeros(nz, dtype=bool)
    for z in gap_slices:
        if not 0 <= int(z) < nz:
            raise ValueError(f"gap slice {z} is outside 0..{nz - 1}")
        gap[int(z)] = True

    # ---- centerline (RPI voxel coordinates, continuous)
    centre_x, centre_y = (nx - 1) / 2, (ny - 1) / 2
    outer_x = CORD_RADII[0] + CSF_WIDTH
    outer_y = CORD_RADII[1] + CSF_WIDTH
    room_x = max(0.0, (nx * sx) / 2 - outer_x - sx)  # mm the curve may move laterally
    room_y = max(0.0, (ny * sy) / 2 - outer_y - sy)
    amp_x = min(float(curvature), room_x)
    amp_y = min(float(curvature) / 2, room_y)
    jitter = rng.uniform(-1.0, 1.0, size=2)  # up to 1 mm off-centre, seed dependent
    zs = np.arange(cord_slices.start, cord_slices.stop)
    u = (zs - cord_slices.start) / max(len(zs) - 1, 1)
    cx = centre_x + (amp_x * np.sin(np.pi * u) - amp_x / 2 + jitter[0] * min(1.0, room_x - amp_x)) / sx
    cy = centre_y + (amp_y * np.sin(2 * np.pi * u) + jitter[1] * min(1.0, room_y - amp_y)) / sy
    centerline_rpi = np.stack([cx, cy, zs.astype(float)], axis=1) if len(zs) else np.zeros((0, 3))

    # ---- cord and CSF: elliptical radius of every in-plane voxel, per cord slice
    x_mm = np.arange(nx, dtype=np.float32)[:, None, None] * sx
    y_mm = np.arange(ny, dtype=np.float32)[None, :, None] * sy
    tissue = np.full(shape, levels["tissue"], dtype=np.float32)
    cord = np.zeros(shape, dtype=np.uint8)
    lesions = np.zeros(shape, dtype=np.uint8)
    if len(zs):
        dx = x_mm - (cx * sx).astype(np.float32)[None, None, :]
        dy = y_mm - (cy * sy).astype(np.float32)[None, None, :]
        r_cord = np.sqrt((dx / CORD_RADII[0]) ** 2 + (dy / CORD_RADII[1]) ** 2)
        r_csf = np.sqrt((dx / outer_x) ** 2 + (dy / outer_y) ** 2)
        # Partial volume: a linear ramp one in-plane voxel wide across each boundary.
        vox = (sx + sy) / 2
        w_csf = np.clip((1 - r_csf) * ((outer_x + outer_y) / 2) / vox + 0.5, 0, 1)
        w_cord = np.clip((1 - r_cord) * (sum(CORD_RADII) / 2) / vox + 0.5, 0, 1)
        sl = slice(cord_slices.start, cord_slices.stop)
        block = levels["tissue"] + (levels["csf"] - levels["tissue"]) * w_csf
        block += (levels["cord"] - levels["csf"]) * w_cord
        tissue[:, :, sl] = block
        cord[:, :, sl] = r_cord <= 1.0
        # A cord narrower than a voxel still gets its centre voxel.
        ix = np.clip(np.rint(cx).astype(int), 0, nx - 1)
        iy = np.clip(np.rint(cy).astype(int), 0, ny - 1)
        cord[ix, iy, zs] = 1

    image = tissue
    _add_blobs(image, rng, blobs, centerline_rpi, zooms, outer_x, outer_y, levels)
    n_placed = _add_lesions(image, lesions, cord, rng, n_lesions, centerline_rpi, zooms, levels)

    image += rng.normal(0.0, noise, size=shape).astype(np.float32) if noise > 0 else 0
    if gap.any():
        # Signal dropout: only a faint background and the noise remain.
        image[:, :, gap] = 0.05 * levels["tissue"] + rng.normal(0.0, max(noise, 1e-3), size=(nx, ny, int(gap.sum())))
    np.maximum(image, 0, out=image)

    # ---- native orientation
    rpi_affine = np.diag([-sx, sy, sz, 1.0])  # L, A, S axes in RAS+ scanner space
    rpi_affine[:3, 3] = -rpi_affine[:3, :3] @ ((np.array(shape) - 1) / 2)  # volume centred on 0
    transform = ornt_transform(axcodes2ornt(("L", "A", "S")), axcodes2ornt(tuple(axcodes)))
    native_affine = rpi_affine @ inv_ornt_aff(transform, shape)
    to_rpi_vox = np.rint(np.linalg.inv(native_affine) @ rpi_affine)
    centerline = centerline_rpi @ to_rpi_vox[:3, :3].T + to_rpi_vox[:3, 3]

    def native(arr, dtype):
        out = np.ascontiguousarray(apply_orientation(arr, transform), dtype=dtype)
        img = nib.Nifti1Image(out, native_affine)
        img.header.set_qform(native_affine, code=1)
        img.header.set_sform(native_affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        return img

    return Phantom(
        image=native(image, np.float32),
        cord=native(cord, np.uint8),
        lesions=native(lesions, np.uint8),
        centerline=centerline,
        centerline_rpi=centerline_rpi,
        cord_slices=cord_slices,
        n_lesions=n_placed,
    )


def _as_range(cord_slices, nz: int) -> range:
    if cord_slices is None:
        return range(0, nz)
    if isinstance(cord_slices, range):
        r = cord_slices
    else:
        start, stop = (int(v) for v in cord_slices)
        r = range(start, stop)
    if r.step != 1 or r.start < 0 or r.stop > nz or r.start > r.stop:
        raise ValueError(f"cord_slices must be a contiguous range within 0..{nz}, got {cord_slices!r}")
    return r


def _box(center_vox, radii_vox, shape):
    lo = [max(0, int(np.floor(c - r))) for c, r in zip(center_vox, radii_vox)]
    hi = [min(n, int(np.ceil(c + r)) + 1) for c, r, n in zip(center_vox, radii_vox, shape)]
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _ellipsoid(box, center_vox, radii_mm, zooms):
    grids = np.ogrid[box]
    r2 = sum(((g - c) * z / r) ** 2 for g, c, z, r in zip(grids, center_vox, zooms, radii_mm))
    return r2


def _add_blobs(image, rng, n, centerline, zooms, outer_x, outer_y, levels) -> None:
    """Gaussian bright and dark blobs whose 2.5-sigma extent stays 5 mm clear of the CSF ring."""
    shape = image.shape
    if n <= 0:
        return
    bright = max(levels.values())
    placed, tries = 0, 0
    while placed < n and tries < 50 * n:
        tries += 1
        radius = rng.uniform(2.0, 5.0)
        c = rng.uniform(0, 1, size=3) * (np.array(shape) - 1)
        if len(centerline):
            row = centerline[np.argmin(np.abs(centerline[:, 2] - c[2]))]
            d = np.hypot((c[0] - row[0]) * zooms[0], (c[1] - row[1]) * zooms[1])
            if d < max(outer_x, outer_y) + 2.5 * radius + 5.0:
                continue
        amp = (bright - levels["tissue"]) * rng.uniform(0.6, 1.0) if placed % 2 == 0 else -0.8 * levels["tissue"]
        radii_vox = [2.5 * radius / z for z in zooms]
        box = _box(c, radii_vox, shape)
        r2 = _ellipsoid(box, c, (radius,) * 3, zooms)
        image[box] += (amp * np.exp(-0.5 * r2)).astype(np.float32)
        placed += 1


def _add_lesions(image, lesions, cord, rng, n, centerline, zooms, levels) -> int:
    """Ellipsoidal lesions centred on cord voxels, spread along z so each is its own component."""
    if n <= 0:
        return 0
    if not len(centerline):
        raise ValueError("lesions need cord slices")
    zs = centerline[:, 2].astype(int)
    extent = int(np.ceil(LESION_RADII[2] / zooms[2]))
    segment = len(zs) / n
    if segment < 2 * extent + 3:
        raise ValueError(f"{n} lesions do not fit separately in {len(zs)} cord slices")
    for k in range(n):
        lo = int(k * segment) + extent + 1
        hi = int((k + 1) * segment) - extent - 1
        i = int(rng.integers(lo, max(lo, hi) + 1)) if hi >= lo else (lo + hi) // 2
        i = min(max(i, 0), len(zs) - 1)
        cx, cy, z = centerline[i]
        # Offset from the cord centre by up to 1 mm, still on a voxel inside the cord.
        c = np.array([np.rint(cx + rng.uniform(-1, 1) / zooms[0]), np.rint(cy + rng.uniform(-1, 1) / zooms[1]), z])
        c[0] = np.clip(c[0], 0, image.shape[0] - 1)
        c[1] = np.clip(c[1], 0, image.shape[1] - 1)
        if not cord[int(c[0]), int(c[1]), int(c[2])]:
            c[:2] = np.clip(np.rint([cx, cy]), 0, np.array(image.shape[:2]) - 1)
        radii_vox = [r / s + 1 for r, s in zip(LESION_RADII, zooms)]
        box = _box(c, radii_vox, image.shape)
        inside = (_ellipsoid(box, c, LESION_RADII, zooms) <= 1.0) & (cord[box] > 0)
        inside[tuple(int(v) - b.start for v, b in zip(c, box))] = bool(cord[tuple(int(v) for v in c)])
        lesions[box] |= inside.astype(np.uint8)
        region = image[box]
        region[inside] = levels["lesion"]
    return n
