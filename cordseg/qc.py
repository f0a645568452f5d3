"""Quality-control pictures: the cord straightened, and its neighbourhood on its axial slices, with an output
outlined, in one PNG.

Checking a segmentation means looking at it, slice by slice, and a study has hundreds of scans. A mosaic of
small axial views centred on the cord (the same physical size and pixel size for every scan) lets a reader
page through a folder of PNGs instead of opening each volume in a viewer. On top, a straightened sagittal strip
shows the whole cord (where it starts and ends); below it, the axial views are in radiological
convention (the patient's right on the left of each view, anterior at the top); the most superior slice
comes first, in reading order. PNG is written here with zlib alone (no imaging package at run time).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .io import load_image, write_bytes_atomic
from .orientation import to_rpi

VIEW_MM = 40.0  # each view's side: the cord, its CSF and some of the canal around it
PIXEL_MM = 0.4  # every view is resampled to this pixel size (100 pixels a side), whatever the scan's voxels
MAX_VIEWS = 60  # a long scan shows this many slices, evenly spaced (slices with lesions first)
COLUMNS = 10
GAP = 2  # pixels between views
COLOURS = {"cord": (255, 64, 64), "lesion": (255, 214, 0), "centerline": (0, 230, 90)}


def _rpi_mask(mask, image_rpi):
    rpi = to_rpi(mask)
    if rpi.data.shape != image_rpi.data.shape or not np.allclose(rpi.affine, image_rpi.affine, atol=1e-3):
        raise InputError("the mask for the QC picture is not on the image's grid")
    return rpi.data > 0.5


def _centres(mask: np.ndarray):
    """Per-slice centre (x, y) of `mask` on every slice from its lowest to its highest, interpolated across
    slices where it is empty."""
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    if len(zs) == 0:
        return None
    cx, cy = np.array([np.argwhere(mask[:, :, z]).mean(axis=0) for z in zs]).T
    z_all = np.arange(zs[0], zs[-1] + 1)
    return z_all, np.interp(z_all, zs, cx), np.interp(z_all, zs, cy)


def _pick_slices(z_all, priority, limit):
    """All slices when they fit, else `priority` slices (lesions) and evenly spaced others, at most `limit`."""
    if len(z_all) <= limit:
        return list(z_all)
    chosen = list(dict.fromkeys(int(z) for z in priority))[:limit]
    others = [int(z) for z in z_all if z not in set(chosen)]
    room = limit - len(chosen)
    if room > 0 and others:
        idx = np.unique(np.round(np.linspace(0, len(others) - 1, room)).astype(int))
        chosen += [others[i] for i in idx]
    return sorted(chosen)


def mosaic(image, overlays: dict, *, track=None) -> np.ndarray:
    """RGB picture (H, W, 3) uint8 of axial views of `image` with each overlay's outline.

    overlays: name -> mask (path or nibabel image on the image's grid); names in COLOURS ("cord", "lesion",
    "centerline"; a centerline is drawn as a small cross). Views are centred on the per-slice centre of
    `track` (a mask on the same grid, e.g. a centerline; not drawn), by default of the first non-empty
    overlay, and cover its slices."""
    img = load_image(image)
    rpi = to_rpi(img)
    unknown = set(overlays) - set(COLOURS)
    if unknown:
        raise InputError(f"unknown QC overlay(s): {', '.join(sorted(unknown))}")
    masks = {name: _rpi_mask(load_image(m), rpi) for name, m in overlays.items()}
    candidates = [_rpi_mask(load_image(track), rpi)] if track is not None else list(masks.values())
    found = next((_centres(m) for m in candidates if m.any()), None)
    if found is None:
        raise InputError("nothing to show: the masks for the QC picture are empty")
    z_all, cx, cy = found
    lesion_slices = np.flatnonzero(masks["lesion"].any(axis=(0, 1))) if "lesion" in masks else []
    slices = _pick_slices(z_all, [z for z in lesion_slices if z_all[0] <= z <= z_all[-1]], MAX_VIEWS)
    n = int(round(VIEW_MM / PIXEL_MM))
    offsets = (np.arange(n) - (n - 1) / 2) * PIXEL_MM
    tiles = []
    for z in slices[::-1]:  # most superior first
        i = int(z - z_all[0])
        # rows: anterior (high y) at the top; columns: the patient's right (low x in RPI) on the left
        gx = np.broadcast_to(cx[i] + offsets[None, :] / rpi.zooms[0], (n, n))
        gy = np.broadcast_to(cy[i] - offsets[:, None] / rpi.zooms[1], (n, n))
        inside = (gx > -0.5) & (gx < rpi.shape[0] - 0.5) & (gy > -0.5) & (gy < rpi.shape[1] - 0.5)
        view = ndi.map_coordinates(rpi.data[:, :, z], [gx, gy], order=1, mode="nearest")
        drawn = {name: ndi.map_coordinates(m[:, :, z].astype(np.uint8), [gx, gy], order=0, mode="constant") > 0
                 for name, m in masks.items()}
        tiles.append(_render(np.where(inside, view, np.nan), drawn))
    strip = _sagittal_strip(rpi, masks, z_all, cx, cy, offsets, max_width=min(len(tiles), COLUMNS) * (n + GAP) - GAP)
    rows = int(np.ceil(len(tiles) / COLUMNS))
    cols = min(len(tiles), COLUMNS)
    top = strip.shape[0] + GAP
    width = max(cols * (n + GAP) - GAP, strip.shape[1])
    canvas = np.full((top + rows * (n + GAP) - GAP, width, 3), 40, np.uint8)
    canvas[:strip.shape[0], :strip.shape[1]] = strip
    for k, tile in enumerate(tiles):
        r, c = divmod(k, COLUMNS)
        canvas[top + r * (n + GAP):top + r * (n + GAP) + n, c * (n + GAP):c * (n + GAP) + n] = tile
    return canvas


def _render(view: np.ndarray, drawn: dict, crosses: bool = True) -> np.ndarray:
    """Grey RGB tile of `view` (NaN: outside the field of view, black) with each mask's outline in its
    colour (a centerline's points as small crosses, or as they are with crosses=False); windowed on its own
    (slices at the coil's reach are several times darker than the middle)."""
    finite = view[np.isfinite(view)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    grey = np.clip((np.nan_to_num(view, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    tile = np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    tile[~np.isfinite(view)] = 0
    for name in ("cord", "lesion", "centerline"):  # lesions drawn over the cord's outline
        if name in drawn:
            mask = drawn[name] & np.isfinite(view)
            if name == "centerline":
                edge = (ndi.binary_dilation(mask, structure=ndi.generate_binary_structure(2, 1), iterations=3)
                        if crosses else mask)
            else:
                edge = mask & ~ndi.binary_erosion(mask)
            tile[edge] = COLOURS[name]
    return tile


def _sagittal_strip(rpi, masks, z_all, cx, cy, offsets, max_width):
    """The cord straightened: for every slice the anterior-posterior line through its centre, side by side,
    the most superior on the left (anterior at the top), at PIXEL_MM per pixel along the cord unless that is
    wider than `max_width` (then squeezed to it). Where the cord starts and ends shows here at a glance."""
    n = len(offsets)
    gx = np.repeat(cx[:, None], n, axis=1)
    gy = cy[:, None] - offsets[None, :] / rpi.zooms[1]
    gz = np.repeat(z_all[:, None].astype(float), n, axis=1)
    inside = (gy > -0.5) & (gy < rpi.shape[1] - 0.5)
    lines = np.where(inside, ndi.map_coordinates(rpi.data, [gx, gy, gz], order=1, mode="nearest"), np.nan)
    mask_lines = {name: ndi.map_coordinates(m.astype(np.uint8), [gx, gy, gz], order=0, mode="constant") > 0
                  for name, m in masks.items()}
    length_mm = len(z_all) * rpi.zooms[2]
    width = int(np.clip(round(length_mm / PIXEL_MM), 1, max(1, max_width)))
    # display column j shows slice position (most superior first); nearest slice, so thick slices stay blocks
    pick = np.clip(np.round((len(z_all) - 1) * (1 - (np.arange(width) + 0.5) / width)), 0, len(z_all) - 1).astype(int)
    view = lines[pick].T  # (n, width): rows anterior -> posterior
    drawn = {name: m[pick].T for name, m in mask_lines.items()}
    return _render(view, drawn, crosses=False)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of `rgb` (H, W, 3) uint8."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"png_bytes needs a non-empty (H, W, 3) array, got {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def write_qc(image, overlays: dict, path, *, track=None) -> Path:
    """Write the mosaic (see `mosaic`) to `path` as PNG, atomically."""
    return write_bytes_atomic(png_bytes(mosaic(image, overlays, track=track)), Path(path))


def qc_path(output) -> Path:
    """Where the CLI writes an output's picture: beside it, `<output stem>_qc.png`."""
    output = Path(output)
    name = output.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + "_qc.png")


__all__ = ["mosaic", "png_bytes", "write_qc", "qc_path"]
