"""Quality-control pictures: the cord straightened, and its neighbourhood on its axial slices, with an output
outlined; one PNG per result, or a study's report page.

Checking a segmentation means looking at it, slice by slice, and a study has hundreds of scans. A mosaic of
small axial views centred on the cord (the same physical size and pixel size for every scan) lets a reader
page through a folder of PNGs instead of opening each volume in a viewer. On top, a straightened sagittal strip
shows the whole cord (where it starts and ends); below it, the axial views are in radiological
convention (the patient's right on the left of each view, anterior at the top); the most superior slice
comes first, in reading order. PNG is written here with zlib alone (no imaging package at run time).

`write_report` turns a study's derivatives folder into a static page (index.html, the page template
qc_page.html filled with the study's table, and the pictures): one row per image, its strip and mosaic at
4 pixels per mm with the outlines on a layer of their own (a palette PNG with a transparent background) so
that the page can hide them, and marks (pass / fail / artifact) kept in the browser and exported as the
selection files the study command reads back.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .errors import CordsegError, InputError, OutputError
from .io import load_image, nifti_stem, same_grid, write_bytes_atomic
from .orientation import reorient_array, to_rpi

VIEW_MM = 40.0  # each view's side: the cord, its CSF and some of the canal around it
PIXEL_MM = 0.25  # every view is resampled to this pixel size (4 per mm, 160 a side), whatever the scan's voxels
MAX_VIEWS = 60  # a long scan shows this many slices, evenly spaced (slices with lesions first)
COLUMNS = 10
REPORT_COLUMNS = 8  # the report's mosaic: 8 views of 160 pixels fit a laptop's screen at full resolution
GAP = 2  # pixels between views
BACKGROUND = 40
COLOURS = {"cord": (255, 64, 64), "lesion": (255, 214, 0), "centerline": (0, 230, 90)}
LABELS = {"cord": 1, "lesion": 2, "centerline": 3}  # outline layer values; later names drawn over earlier ones


def _rpi_mask(mask, image_rpi):
    rpi = to_rpi(mask)
    if not same_grid(rpi.affine, rpi.data.shape, image_rpi.affine, image_rpi.data.shape):
        raise InputError("the mask for the QC picture is not on the image's grid")
    return rpi.data > 0.5


def _mask_on(path, rpi) -> np.ndarray:
    """A mask file as a boolean RPI array on the grid of `rpi`, read as stored (a report reads hundreds: the
    float copy and checks of load_image cost as much as the picture); anything unusual takes load_image's way,
    with its messages."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        quick = len(img.shape) == 3 and same_grid(img.affine, img.shape, rpi.native_affine, rpi.native_shape)
    except Exception:  # noqa: BLE001 - only decides which way to read; load_image reports the problem
        quick = False
    if not quick:
        return _rpi_mask(load_image(path), rpi)
    return reorient_array(np.asanyarray(img.dataobj) > 0.5, rpi.transform)


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


def _prepare(image, overlays: dict, track=None):
    """The image in RPI and each overlay (and `track`) as a boolean RPI array on its grid."""
    rpi = to_rpi(load_image(image))
    unknown = set(overlays) - set(COLOURS)
    if unknown:
        raise InputError(f"unknown QC overlay(s): {', '.join(sorted(unknown))}")
    masks = {name: _rpi_mask(load_image(m), rpi) for name, m in overlays.items()}
    return rpi, masks, (_rpi_mask(load_image(track), rpi) if track is not None else None)


def _bilinear(data: np.ndarray, x, y, z):
    """data[x, y, z], linear in x and y (clamped at the edges, as map_coordinates' mode 'nearest'), z an
    integer index; the arguments broadcast. Gathers four neighbours: the views' grids are separable, so
    this is several times faster than map_coordinates on them."""
    nx, ny = data.shape[:2]
    x = np.clip(x, 0, nx - 1)
    y = np.clip(y, 0, ny - 1)
    x0, y0 = np.floor(x).astype(np.intp), np.floor(y).astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, nx - 1), np.minimum(y0 + 1, ny - 1)
    fx, fy = x - x0, y - y0
    return ((1 - fx) * ((1 - fy) * data[x0, y0, z] + fy * data[x0, y1, z])
            + fx * ((1 - fy) * data[x1, y0, z] + fy * data[x1, y1, z]))


def _nearest(mask: np.ndarray, x, y, z):
    """mask[x, y, z] at the nearest voxel, False outside the grid; as `_bilinear`."""
    nx, ny = mask.shape[:2]
    xi, yi = np.floor(np.asarray(x) + 0.5).astype(np.intp), np.floor(np.asarray(y) + 0.5).astype(np.intp)
    inside = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
    return mask[np.clip(xi, 0, nx - 1), np.clip(yi, 0, ny - 1), z] & inside


def _layers(rpi, masks: dict, *, track=None, pixel_mm: float = PIXEL_MM, squeeze_columns=None) -> dict:
    """The pieces of a picture before they are laid out: `tiles` (k, n, n) and `strip` (n, w), grey uint8
    (0 outside the field of view), with `tile_labels` and `strip_labels` of the same shapes (LABELS[name] on
    a pixel of that mask's outline, else 0); `slices`: the RPI slice of each tile, most superior first.

    rpi: the image in RPI; masks: name -> boolean RPI array; track: the mask the views follow (default:
    the first non-empty one). The strip has `pixel_mm` per pixel along the cord, or is squeezed to the width
    of `squeeze_columns` views when it is wider than that (None: never squeezed)."""
    candidates = [track] if track is not None else list(masks.values())
    found = next((_centres(m) for m in candidates if m.any()), None)
    if found is None:
        raise InputError("nothing to show: the masks for the QC picture are empty")
    z_all, cx, cy = found
    lesion_slices = np.flatnonzero(masks["lesion"].any(axis=(0, 1))) if "lesion" in masks else []
    slices = _pick_slices(z_all, [z for z in lesion_slices if z_all[0] <= z <= z_all[-1]], MAX_VIEWS)[::-1]
    n = int(round(VIEW_MM / pixel_mm))
    offsets = (np.arange(n) - (n - 1) / 2) * pixel_mm
    tiles = np.zeros((len(slices), n, n), np.uint8)
    tile_labels = np.zeros((len(slices), n, n), np.uint8)
    for k, z in enumerate(slices):  # most superior first
        i = int(z - z_all[0])
        # rows: anterior (high y) at the top; columns: the patient's right (low x in RPI) on the left
        gx = (cx[i] + offsets / rpi.zooms[0])[None, :]
        gy = (cy[i] - offsets / rpi.zooms[1])[:, None]
        inside = (gx > -0.5) & (gx < rpi.shape[0] - 0.5) & (gy > -0.5) & (gy < rpi.shape[1] - 0.5)
        view = _bilinear(rpi.data, gx, gy, z)
        drawn = {name: _nearest(m, gx, gy, z) for name, m in masks.items()}
        tiles[k], tile_labels[k] = _render(np.where(inside, view, np.nan), drawn)
    max_width = None if squeeze_columns is None else min(len(slices), squeeze_columns) * (n + GAP) - GAP
    strip, strip_labels = _sagittal_strip(rpi, masks, z_all, cx, cy, offsets, pixel_mm, max_width)
    return {"tiles": tiles, "tile_labels": tile_labels, "strip": strip, "strip_labels": strip_labels,
            "slices": [int(z) for z in slices], "lesion_slices": sorted({int(z) for z in lesion_slices}),
            "view": n, "slice_mm": float(rpi.zooms[2])}


def _grid(tiles: np.ndarray, columns: int, fill: int) -> np.ndarray:
    """Tiles (k, n, n) side by side, `columns` to a row, GAP pixels of `fill` between them and in the unused
    cells of the last row."""
    k, n = len(tiles), tiles.shape[1]
    rows, cols = int(np.ceil(k / columns)), min(k, columns)
    out = np.full((rows * (n + GAP) - GAP, cols * (n + GAP) - GAP), fill, tiles.dtype)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (n + GAP):r * (n + GAP) + n, c * (n + GAP):c * (n + GAP) + n] = tile
    return out


def _colour(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    for name, value in LABELS.items():
        rgb[labels == value] = COLOURS[name]
    return rgb


def mosaic(image, overlays: dict, *, track=None, pixel_mm: float = PIXEL_MM) -> np.ndarray:
    """RGB picture (H, W, 3) uint8 of axial views of `image` with each overlay's outline.

    overlays: name -> mask (path or nibabel image on the image's grid); names in COLOURS ("cord", "lesion",
    "centerline"; a centerline is drawn as a small cross). Views are centred on the per-slice centre of
    `track` (a mask on the same grid, e.g. a centerline; not drawn), by default of the first non-empty
    overlay, and cover its slices. On top, the straightened strip, squeezed to the mosaic's width."""
    rpi, masks, track = _prepare(image, overlays, track)
    parts = _layers(rpi, masks, track=track, pixel_mm=pixel_mm, squeeze_columns=COLUMNS)
    strip = _colour(parts["strip"], parts["strip_labels"])
    grid = _colour(_grid(parts["tiles"], COLUMNS, BACKGROUND), _grid(parts["tile_labels"], COLUMNS, 0))
    top = strip.shape[0] + GAP
    canvas = np.full((top + grid.shape[0], max(grid.shape[1], strip.shape[1]), 3), BACKGROUND, np.uint8)
    canvas[:strip.shape[0], :strip.shape[1]] = strip
    canvas[top:, :grid.shape[1]] = grid
    return canvas


def _render(view: np.ndarray, drawn: dict, crosses: bool = True):
    """(grey, labels) uint8 tiles of `view` (NaN: outside the field of view, black) and of each mask's
    outline (a centerline's points as small crosses, or as they are with crosses=False); windowed on its own
    (slices at the coil's reach are several times darker than the middle)."""
    finite = np.isfinite(view)
    values = view[finite][::3]  # a third of the pixels window the view as well, three times faster
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    grey = (np.clip((np.nan_to_num(view, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    grey[~finite] = 0
    labels = np.zeros(view.shape, np.uint8)
    for name, value in LABELS.items():  # lesions drawn over the cord's outline
        if name in drawn:
            mask = drawn[name] & finite
            if name == "centerline":
                edge = (ndi.binary_dilation(mask, structure=ndi.generate_binary_structure(2, 1), iterations=3)
                        if crosses else mask)
            else:
                edge = mask & ~ndi.binary_erosion(mask)
            labels[edge] = value
    return grey, labels


def _sagittal_strip(rpi, masks, z_all, cx, cy, offsets, pixel_mm, max_width):
    """The cord straightened: for every slice the anterior-posterior line through its centre, side by side,
    the most superior on the left (anterior at the top), at `pixel_mm` per pixel along the cord unless that
    is wider than `max_width` (then squeezed to it). Where the cord starts and ends shows here at a glance.
    Returns (grey, labels) as `_render`."""
    gx = cx[:, None]
    gy = cy[:, None] - offsets[None, :] / rpi.zooms[1]
    gz = z_all[:, None]
    inside = (gy > -0.5) & (gy < rpi.shape[1] - 0.5)
    lines = np.where(inside, _bilinear(rpi.data, gx, gy, gz), np.nan)
    mask_lines = {name: _nearest(m, gx, gy, gz) for name, m in masks.items()}
    length_mm = len(z_all) * rpi.zooms[2]
    width = max(1, int(round(length_mm / pixel_mm)))
    if max_width is not None:
        width = min(width, max(1, max_width))
    # display column j shows slice position (most superior first); nearest slice, so thick slices stay blocks
    pick = np.clip(np.round((len(z_all) - 1) * (1 - (np.arange(width) + 0.5) / width)), 0, len(z_all) - 1).astype(int)
    view = lines[pick].T  # (n, width): rows anterior -> posterior
    drawn = {name: m[pick].T for name, m in mask_lines.items()}
    return _render(view, drawn, crosses=False)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(rows: np.ndarray, colour_type: int, extra: bytes = b"", level: int = 6, up: bool = False) -> bytes:
    """PNG of `rows` (H, W * channels) uint8; every row filtered with 'Up' (the difference from the row
    above: smaller and faster to compress on images) or not at all."""
    h, row_bytes = rows.shape
    channels = {0: 1, 2: 3, 3: 1}[colour_type]
    if up:
        rows = np.concatenate([rows[:1], rows[1:] - rows[:-1]])  # uint8 arithmetic wraps, as PNG's does
    raw = np.concatenate([np.full((h, 1), 2 if up else 0, np.uint8), rows], axis=1)
    header = struct.pack(">IIBBBBB", row_bytes // channels, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _chunk(b"IEND", b""))


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of `rgb` (H, W, 3) uint8."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"png_bytes needs a non-empty (H, W, 3) array, got {rgb.shape}")
    h, w, _ = rgb.shape
    return _png(rgb.reshape(h, w * 3), 2)


def grey_png_bytes(grey: np.ndarray, level: int = 6) -> bytes:
    """An 8-bit greyscale PNG of `grey` (H, W) uint8 (rows filtered with 'Up')."""
    grey = np.ascontiguousarray(grey, np.uint8)
    if grey.ndim != 2 or 0 in grey.shape:
        raise ValueError(f"grey_png_bytes needs a non-empty (H, W) array, got {grey.shape}")
    return _png(grey, 0, level=level, up=True)


def outline_png_bytes(labels: np.ndarray, level: int = 6) -> bytes:
    """A palette PNG of an outline layer (H, W) of LABELS values: each in its COLOURS colour, 0 transparent."""
    labels = np.ascontiguousarray(labels, np.uint8)
    if labels.ndim != 2 or 0 in labels.shape or labels.max(initial=0) > max(LABELS.values()):
        raise ValueError(f"outline_png_bytes needs a non-empty (H, W) array of LABELS values, got {labels.shape}")
    palette = bytes([0, 0, 0]) + b"".join(bytes(COLOURS[name]) for name in sorted(LABELS, key=LABELS.get))
    alpha = bytes([0]) + bytes([255]) * len(LABELS)
    return _png(labels, 3, _chunk(b"PLTE", palette) + _chunk(b"tRNS", alpha), level=level)


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


# --------------------------------------------------------------------------- the study's report page

REPORT_LEVEL = 1  # zlib level of the report's pictures: with the 'Up' filter, smaller than level 6 unfiltered
TEMPLATE = "qc_page.html"
_DATA_MARK = "__CORDSEG_QC_DATA__"
_MASK_NAME = re.compile(r"^(?P<stem>.+?)(?:_desc-(?P<desc>[A-Za-z0-9]+))?_label-(?P<label>SC|lesion|centerline)"
                        r"_(?:seg|mask)\.nii(?:\.gz)?$")
_LABEL_NAMES = {"SC": "cord", "lesion": "lesion", "centerline": "centerline"}
_NUMBERS = ("cord_volume_mm3", "lesion_count", "lesion_volume_mm3")


@dataclass
class _Entry:
    """One row of the report: an image of the study and the masks made from it."""
    image: str  # the source's path relative to the raw dataset (what selection files name)
    subject: str = ""
    session: str = ""
    contrast: str = ""
    task: str = ""
    status: str = ""
    reason: str = ""
    source: Path | None = None
    masks: dict = field(default_factory=dict)  # "cord" / "lesion" / "centerline" -> Path
    values: dict = field(default_factory=dict)  # from results.tsv: _NUMBERS -> float


def _entities(name: str) -> tuple[str, str, str]:
    """(subject, session, contrast) from a BIDS file name: `sub-X`, `ses-Y` and the suffix (T2w...)."""
    stem = nifti_stem(name)
    sub = re.search(r"(?:^|_)(sub-[A-Za-z0-9]+)", stem)
    ses = re.search(r"(?:^|_)(ses-[A-Za-z0-9]+)", stem)
    parts = stem.split("_")
    suffix = parts[-1] if len(parts) > 1 and "-" not in parts[-1] else ""
    return (sub.group(1) if sub else ""), (ses.group(1) if ses else ""), suffix


def _raw_root(deriv: Path) -> Path | None:
    """The raw dataset the derivatives were made from: DatasetLinks.raw of dataset_description.json (relative
    to the derivatives folder), else the BIDS layout's BIDS/derivatives/<pipeline>."""
    try:
        description = json.loads((deriv / "dataset_description.json").read_text(encoding="utf-8"))
        raw = description.get("DatasetLinks", {}).get("raw")
        if isinstance(raw, str) and raw:
            return (deriv / raw).resolve()
    except (OSError, ValueError, AttributeError):
        pass
    return deriv.parent.parent if deriv.parent.name == "derivatives" else None


def _relative(path: Path, root: Path | None) -> str | None:
    if root is None:
        return None
    try:
        path, root = path.resolve(), root.resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else None
    except (OSError, ValueError):
        return None


def _sources(mask: Path, deriv: Path, raw: Path | None) -> list[tuple[Path | None, str | None]]:
    """(path, path relative to the raw dataset) of each source that `mask`'s JSON sidecar names: `bids:raw:`
    URIs against the raw dataset, `bids::` against the derivatives, absolute paths as they are."""
    try:
        sidecar = json.loads(mask.with_name(nifti_stem(mask) + ".json").read_text(encoding="utf-8"))
        sources = sidecar.get("Sources") or []
    except (OSError, ValueError, AttributeError):
        return []
    found = []
    for s in sources if isinstance(sources, list) else [sources]:
        if not isinstance(s, str) or not s:
            continue
        if s.startswith("bids:raw:"):
            rel = s[len("bids:raw:"):].lstrip("/")
            found.append((raw / rel if raw is not None else None, rel))
        elif s.startswith("bids::"):
            found.append((deriv / s[len("bids::"):].lstrip("/"), None))
        elif os.path.isabs(s):
            found.append((Path(s), _relative(Path(s), raw)))
        else:
            found.append(((raw or deriv) / s, s))
    return found


def _discover(deriv: Path, skip: Path | None) -> list[_Entry]:
    """The images of a derivatives folder: masks grouped by their source's stem and folder (a lesion mask
    and the cord mask beside it make one row), each with its source image."""
    raw = _raw_root(deriv)
    groups: dict = {}
    for path in sorted(deriv.rglob("*_seg.nii*")) + sorted(deriv.rglob("*_mask.nii*")):
        if skip is not None and skip in path.resolve().parents:
            continue
        m = _MASK_NAME.match(path.name)
        if m is None or not path.is_file():
            continue
        label = _LABEL_NAMES[m["label"]]
        groups.setdefault((path.parent, m["stem"]), {}).setdefault(label, []).append((m["desc"] or "", path))
    entries = []
    for (folder, stem), by_label in groups.items():
        # a mask without desc- first, then the first by its desc- label
        masks = {label: sorted(found)[0][1] for label, found in by_label.items()}
        rel_dir = folder.relative_to(deriv).as_posix()
        source, rel = None, None
        for mask in masks.values():
            for path, rel_found in _sources(mask, deriv, raw):
                source, rel = (source or path), (rel or rel_found)
            if source is not None:
                break
        if source is None or not source.is_file():
            base = (raw / rel_dir) if raw is not None else None
            for suffix in (".nii.gz", ".nii"):
                if base is not None and (base / (stem + suffix)).is_file():
                    source, rel = base / (stem + suffix), rel or f"{rel_dir}/{stem}{suffix}"
                    break
        if rel is None:
            rel = _relative(source, raw) if source is not None else None
        rel = rel or f"{rel_dir}/{source.name if source is not None else stem + '.nii.gz'}"
        sub, ses, contrast = _entities(Path(rel).name)
        entries.append(_Entry(image=rel, subject=sub, session=ses, contrast=contrast, source=source, masks=masks,
                              task="+".join(t for t, key in (("sc", "cord"), ("lesion", "lesion"),
                                                             ("centerline", "centerline")) if key in masks)))
    return entries


def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _read_results(deriv: Path) -> list[dict]:
    path = deriv / "results.tsv"
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k}
                    for row in csv.DictReader(fh, delimiter="\t")]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from None


def _merge_results(entries: list[_Entry], rows: list[dict]) -> list[_Entry]:
    """results.tsv's values over what the masks say; its rows without masks (failed, skipped) as rows too."""
    by_path = {e.image: e for e in entries}
    by_name: dict = {}
    for e in entries:
        by_name.setdefault(Path(e.image).name, []).append(e)
    for row in rows:
        image = row.get("image", "").replace("\\", "/").removeprefix("./")
        if not image:
            continue
        entry = by_path.get(image)
        if entry is None and len(by_name.get(Path(image).name, [])) == 1:
            entry = by_name[Path(image).name][0]
        if entry is None:
            sub, ses, contrast = _entities(Path(image).name)
            entry = _Entry(image=image, subject=sub, session=ses, contrast=contrast)
            entries.append(entry)
            by_path[image] = entry
        row = {k: v for k, v in row.items() if v and v.lower() != "n/a"}
        for key in ("subject", "session", "status", "reason"):
            if row.get(key):
                setattr(entry, key, row[key])
        # the BIDS suffix, and the model's contrast when it says more (T2w (t2), MTS (t2s))
        suffix = row.get("suffix") or entry.contrast or row.get("contrast", "")
        model = row.get("contrast", "")
        differs = model and suffix and model.lower() != suffix.lower()
        entry.contrast = f"{suffix} ({model})" if differs else suffix or model
        entry.task = (row.get("task") or row.get("tasks") or entry.task).replace(",", "+")
        entry.values = {k: _number(row.get(k)) for k in _NUMBERS if _number(row.get(k)) is not None}
    for entry in entries:
        if entry.subject and not entry.subject.startswith("sub-"):
            entry.subject = "sub-" + entry.subject
        if entry.session and not entry.session.startswith("ses-"):
            entry.session = "ses-" + entry.session
    return entries


def _keys(entries: list[_Entry]) -> list[str]:
    """A file-name-safe, unique key per row, from the image's name."""
    keys, seen = [], set()
    for e in entries:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", nifti_stem(Path(e.image).name)) or "image"
        key, i = base, 1
        while key.lower() in seen:
            i += 1
            key = f"{base}-{i}"
        seen.add(key.lower())
        keys.append(key)
    return keys


def _mask_values(masks: dict, voxel_mm3: float) -> dict:
    """Cord volume, lesion count (26-connected) and lesion volume from the (boolean) masks themselves."""
    from .metrics import label_lesions

    values = {}
    if "cord" in masks:
        values["cord_volume_mm3"] = float(masks["cord"].sum() * voxel_mm3)
    if "lesion" in masks:
        lesions = masks["lesion"]
        found = ndi.find_objects(lesions.astype(np.uint8))  # labelled within the lesions' bounding box only
        box = found[0] if found else (slice(0, 0),) * 3
        values["lesion_count"] = float(label_lesions(lesions[box])[1]) if found else 0.0
        values["lesion_volume_mm3"] = float(lesions.sum() * voxel_mm3)
    return values


def _report_picture(key: str, source: str, masks: dict, img_dir: str) -> dict:
    """One row's pictures (strip and mosaic, grey and outline layers) written into `img_dir`, and its values;
    an error that concerns this image alone is returned as its `error`, not raised."""
    out = {"key": key, "values": {}, "picture": None, "error": ""}
    try:
        rpi = to_rpi(load_image(source))
        loaded = {name: _mask_on(path, rpi) for name, path in masks.items()}
        out["values"] = _mask_values(loaded, float(np.prod(rpi.zooms)))
        # the views follow the centerline, else the cord; the centerline is drawn only without a cord
        track = next((loaded[name] for name in ("centerline", "cord", "lesion")
                      if name in loaded and loaded[name].any()), None)
        if track is None:
            out["error"] = "the masks are empty: nothing to show"
            return out
        overlays = {name: m for name, m in loaded.items() if name != "centerline" or "cord" not in loaded}
        parts = _layers(rpi, overlays, track=track)
        strip, strip_labels = parts["strip"], parts["strip_labels"]
        grid = _grid(parts["tiles"], REPORT_COLUMNS, BACKGROUND)
        grid_labels = _grid(parts["tile_labels"], REPORT_COLUMNS, 0)
        folder = Path(img_dir)
        names = {"strip": f"{key}_strip.png", "strip_outline": f"{key}_strip_outline.png",
                 "mosaic": f"{key}_axial.png", "mosaic_outline": f"{key}_axial_outline.png"}
        for name, data in (("strip", grey_png_bytes(strip, REPORT_LEVEL)),
                           ("strip_outline", outline_png_bytes(strip_labels, REPORT_LEVEL)),
                           ("mosaic", grey_png_bytes(grid, REPORT_LEVEL)),
                           ("mosaic_outline", outline_png_bytes(grid_labels, REPORT_LEVEL))):
            write_bytes_atomic(data, folder / names[name])
        out["picture"] = {**{k: f"{folder.name}/{v}" for k, v in names.items()},
                          "strip_size": [int(strip.shape[1]), int(strip.shape[0])],
                          "mosaic_size": [int(grid.shape[1]), int(grid.shape[0])],
                          "view": parts["view"], "gap": GAP, "columns": REPORT_COLUMNS, "slices": parts["slices"],
                          "lesion_slices": parts["lesion_slices"], "slice_mm": parts["slice_mm"],
                          "pixel_mm": PIXEL_MM}
    except CordsegError as exc:
        out["error"] = str(exc)
    return out


def _template() -> str:
    from importlib import resources

    try:
        return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    except (OSError, FileNotFoundError) as exc:
        raise OutputError(f"the QC page template {TEMPLATE} is missing from the installed package ({exc})") from None


def _page(data: dict) -> bytes:
    template = _template()
    if _DATA_MARK not in template:
        raise OutputError(f"the QC page template {TEMPLATE} has no {_DATA_MARK} mark")
    # JSON in a <script> element: '</' must not close it
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")
    return template.replace(_DATA_MARK, text, 1).encode("utf-8")


def write_report(derivatives_dir, out_dir, *, progress=None, workers: int | None = None) -> Path:
    """Write a study's QC report into `out_dir`: index.html and img/ (static files, no network needed).

    derivatives_dir: what `cordseg study` wrote (masks named `<image>_label-SC_seg.nii.gz`,
    `_label-lesion_seg`, `_label-centerline_seg`, each with a JSON sidecar whose `Sources` names the image;
    results.tsv when there). One row per image; the numbers come from results.tsv when it has them, else from
    the masks. progress(stage, fraction) is called as pictures are done. workers: threads drawing the
    pictures (default: one per CPU). Returns the path of index.html. An image that cannot be shown (missing,
    not on its masks' grid, empty masks) gets a row with the reason; a folder with no result at all is an
    InputError."""
    from . import __version__

    deriv = Path(derivatives_dir)
    if not deriv.is_dir():
        raise InputError(f"{deriv}: not a folder (give the folder the study command wrote)")
    out = Path(out_dir)
    entries = _merge_results(_discover(deriv, out.resolve() if out.exists() else None), _read_results(deriv))
    if not entries:
        raise InputError(f"{deriv}: no cordseg results here (no *_label-SC_seg / *_label-lesion_seg masks, "
                         "no results.tsv)")
    entries.sort(key=lambda e: (e.subject, e.session, e.image))
    img_dir = out / "img"
    try:
        img_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the report folder ({exc.strerror or exc})") from None
    keys = _keys(entries)
    jobs = [(key, str(e.source), {n: str(p) for n, p in e.masks.items()}, str(img_dir))
            for key, e in zip(keys, entries) if e.masks and e.source is not None and e.source.is_file()]
    results = {}
    n_workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    if progress:
        progress("QC report", 0.0)
    if n_workers == 1:
        for k, job in enumerate(jobs, 1):
            results[job[0]] = _report_picture(*job)
            if progress:
                progress("QC report", k / len(jobs))
    else:
        # threads, not processes: reading (zlib), copies and gathers run outside the GIL, and a caller's script
        # is never imported again by a worker process nor forked with its inference threads
        with ThreadPoolExecutor(n_workers) as pool:
            futures = [pool.submit(_report_picture, *job) for job in jobs]
            for k, future in enumerate(as_completed(futures), 1):
                result = future.result()
                results[result["key"]] = result
                if progress:
                    progress("QC report", k / len(jobs))
    rows = []
    for key, e in zip(keys, entries):
        done = results.get(key, {})
        values = {**done.get("values", {}), **e.values}
        error = done.get("error", "")
        if not done:
            error = ("no output" if not e.masks else
                     f"source image not found ({e.source})" if e.source is not None else "source image not found")
        rows.append({"key": key, "image": e.image, "subject": e.subject, "session": e.session,
                     "contrast": e.contrast, "task": e.task, "status": e.status or ("ok" if not error else "error"),
                     "reason": e.reason or error, "cord_volume_mm3": values.get("cord_volume_mm3"),
                     "lesion_count": values.get("lesion_count"), "lesion_volume_mm3": values.get("lesion_volume_mm3"),
                     "masks": {n: Path(os.path.relpath(p, deriv)).as_posix() for n, p in e.masks.items()},
                     "picture": done.get("picture"), "error": error})
    resolved = str(deriv.resolve())
    raw = _raw_root(deriv)
    name = _dataset_name(raw) or (raw.name if raw is not None else deriv.resolve().name)
    data = {"title": f"cordseg QC: {name}", "derivatives": resolved,
            "raw": str(raw) if raw is not None else "", "version": __version__,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "pixel_mm": PIXEL_MM,
            "report_id": hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:12],
            "colours": {name: "#%02x%02x%02x" % COLOURS[name] for name in COLOURS}, "images": rows}
    return write_bytes_atomic(_page(data), out / "index.html")


def _dataset_name(raw: Path | None) -> str:
    if raw is None:
        return ""
    try:
        name = json.loads((raw / "dataset_description.json").read_text(encoding="utf-8")).get("Name")
    except (OSError, ValueError, AttributeError):
        return ""
    return name if isinstance(name, str) else ""


__all__ = ["mosaic", "png_bytes", "grey_png_bytes", "outline_png_bytes", "write_qc", "qc_path", "write_report"]
