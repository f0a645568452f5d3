"""Cord segmentation on diffusion-weighted images: the two real DWI scans of ../shared/data and DWI-like images
simulated from the spine-generic manual masks.

python bench/dwi.py [--sc F.onnx] [--centerline F.onnx] [--thresholds 0.3,0.4,0.5] [--json FILE] [--png DIR]

Real scans (no manual cord mask exists for either, so a reference is made here from the image alone):
- sct_testing/dmri/dwi_mean (40x42x5, 0.84x0.84x17.5 mm), seeded by the published OptiC centerline beside it;
- extra/dmri.nii.gz, a 4D series (96x36x15x35, 0.9x0.9x5 mm) read as `--volume mean` reads it (the mean of its
  30 diffusion-weighted volumes), and its volume 10 alone (one diffusion-weighted volume, noisier).
On a mean DWI the cord is the brightest tissue and the CSF around it is dark, so the reference outline is the
cord's half-maximum contour, slice by slice: plateau = 90th percentile within 2.5 mm of the seed, floor = the
median 7-12 mm from it, kept = the connected region above (plateau + floor) / 2 that holds the seed, within
7 mm of it, holes filled. The dmri seeds are the brightest point of each slice smoothed by 2 mm, within 12 mm
of their median. Both references were checked by eye (--png draws them).

Simulated DWI (the models' training never saw these anatomies): each spine-generic subject's T2w cord and CSF
masks (0.5 mm in plane, 5 mm slices), drawn as a mean DWI with its own simple model (cord 1, CSF 0.05-0.15,
other tissue a smooth field of 0.1-0.4, a 1 mm in-plane blur, Rician noise at a cord signal-to-noise ratio of
6-15), averaged to 1 mm in plane and cropped to 64x48 mm around the cord; the reference is the manual cord
mask averaged the same way (kept where >= 0.5).
Prints Dice and predicted/reference volume per image, and the medians.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

import cordseg
from cordseg import metrics
from cordseg.datasets import shared_data
from cordseg.inference import find_model
from cordseg.io import load_image


def half_max_outline(data, zooms, seeds):
    """Reference cord mask of a DWI: each slice's half-maximum region around its seed (x, y) (see above)."""
    out = np.zeros(data.shape, np.uint8)
    xx, yy = np.meshgrid(np.arange(data.shape[0]) * zooms[0], np.arange(data.shape[1]) * zooms[1], indexing="ij")
    for z, seed in seeds.items():
        sl = data[:, :, z].astype(np.float64)
        d = np.hypot(xx - seed[0] * zooms[0], yy - seed[1] * zooms[1])
        plateau = np.percentile(sl[d <= 2.5], 90)
        floor = np.median(sl[(d >= 7) & (d <= 12)])
        above = (sl > floor + 0.5 * (plateau - floor)) & (d <= 7)
        lab, n = ndi.label(above)
        if n == 0:
            continue
        core = lab[d <= 2.5]
        keep = np.bincount(core[core > 0], minlength=n + 1).argmax() if (core > 0).any() else 0
        if keep:
            out[:, :, z] = ndi.binary_fill_holes(lab == keep)
    return out


def optic_seeds(path):
    """{slice: (x, y)} of a centerline mask (one voxel per slice)."""
    c = np.asarray(nib.load(path).dataobj) > 0
    return {z: tuple(np.argwhere(c[:, :, z]).mean(axis=0)) for z in range(c.shape[2]) if c[:, :, z].any()}


def brightest_seeds(data, zooms):
    """{slice: (x, y)}: each slice's brightest point after a 2 mm smoothing, within 12 mm of their median."""
    sm = ndi.gaussian_filter(data.astype(np.float64), (2 / zooms[0], 2 / zooms[1], 0))
    raw = np.array([np.unravel_index(np.argmax(sm[:, :, z]), sm.shape[:2]) for z in range(data.shape[2])], float)
    centre = np.median(raw, axis=0)
    seeds = {}
    xx, yy = np.meshgrid(np.arange(data.shape[0]), np.arange(data.shape[1]), indexing="ij")
    near = np.hypot((xx - centre[0]) * zooms[0], (yy - centre[1]) * zooms[1]) <= 12
    for z in range(data.shape[2]):
        s = np.where(near, sm[:, :, z], -np.inf)
        seeds[z] = np.unravel_index(np.argmax(s), s.shape)
    return seeds


def real_cases(data_dir):
    """[(name, image, reference mask array)]."""
    cases = []
    dwi = load_image(data_dir / "sct_testing/dmri/dwi_mean.nii.gz")
    arr = np.asarray(dwi.dataobj, np.float32)
    ref = half_max_outline(arr, dwi.header.get_zooms()[:3],
                           optic_seeds(data_dir / "sct_testing/dmri/dwi_mean_centerline-optic.nii.gz"))
    cases.append(("dwi_mean (17.5 mm)", dwi, ref))
    series = data_dir / "extra/dmri.nii.gz"
    mean = load_image(series, volume="mean")
    arr = np.asarray(mean.dataobj, np.float32)
    ref = half_max_outline(arr, mean.header.get_zooms()[:3], brightest_seeds(arr, mean.header.get_zooms()[:3]))
    cases.append(("dmri --volume mean (5 mm)", mean, ref))
    cases.append(("dmri --volume 10 (5 mm)", load_image(series, volume=10), ref))
    return cases


def simulated_cases(data_dir, seed=2024):
    """[(name, image, reference)]: mean-DWI-like images drawn on the spine-generic T2w masks."""
    rng = np.random.default_rng(seed)
    folder = data_dir / "labelmaps/spinegeneric"
    cases = []
    for cord_path in sorted(folder.glob("*_T2w_seg-manual.nii.gz")):
        csf_path = folder / cord_path.name.replace("_seg-manual", "_csfseg-manual")
        if not csf_path.exists():
            continue
        img = nib.load(cord_path)
        cord = np.asarray(img.dataobj) > 0.5
        csf = (np.asarray(nib.load(csf_path).dataobj) > 0.5) & ~cord
        zooms = np.array(img.header.get_zooms()[:3], float)
        other = rng.uniform(0.1, 0.4)
        field = ndi.gaussian_filter(rng.normal(0, 1, cord.shape), (12, 12, 1))
        field = other * (1 + 0.5 * field / (np.abs(field).max() + 1e-9))
        x = np.where(cord, 1.0, np.where(csf, rng.uniform(0.05, 0.15), field))
        x = ndi.gaussian_filter(x, (1.0 / 2.355 / zooms[0] * 2, 1.0 / 2.355 / zooms[1] * 2, 0))
        sigma = 1.0 / rng.uniform(6, 15)
        x = np.hypot(x + rng.normal(0, sigma, x.shape), rng.normal(0, sigma, x.shape))
        # 1 mm in plane, cropped to 64 x 48 mm around the cord
        k = max(1, int(round(1.0 / zooms[0])))
        cx, cy = np.argwhere(cord).mean(axis=0)[:2]
        hx, hy = int(32 / zooms[0]), int(24 / zooms[1])
        x0, y0 = max(0, int(cx) - hx), max(0, int(cy) - hy)
        box = (slice(x0, x0 + 2 * hx), slice(y0, y0 + 2 * hy))

        def pool(a):
            a = a[box].astype(np.float32)
            nx, ny = a.shape[0] // k, a.shape[1] // k
            return a[: nx * k, : ny * k].reshape(nx, k, ny, k, a.shape[2]).mean(axis=(1, 3))

        aff = img.affine.copy()
        aff[:3, 3] = img.affine[:3, :3] @ np.array([x0 + (k - 1) / 2, y0 + (k - 1) / 2, 0]) + img.affine[:3, 3]
        aff[:3, :2] = img.affine[:3, :2] * k
        out = nib.Nifti1Image(pool(x) * 1000.0, aff)
        out.set_qform(aff, 1)
        out.set_sform(aff, 1)
        name = cord_path.name.split("_")[0].replace("sub-", "") + " (sim)"
        cases.append((name, out, (pool(cord) >= 0.5).astype(np.uint8)))
    return cases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=shared_data())
    p.add_argument("--sc", type=Path, help="a cord model to measure instead of the installed one")
    p.add_argument("--centerline", type=Path, help="a centerline model to measure instead of the installed one")
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path, help="draw each image with the reference (green) and the mask (red) here")
    p.add_argument("--thresholds", help="also measure the masks at these cord thresholds (comma-separated; the "
                   "simulated images are the ones to choose one on, the real ones to report)")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    sc = a.sc or find_model("sc", None).path  # a model that does not serve dwi is measured too
    seg = cordseg.Segmenter("dwi", centerline_model=a.centerline, cord_model=sc)
    rows = []
    print(f"{'image':28s} {'shape':>10s} {'dice':>6s} {'vol ratio':>9s}")
    for group, cases in (("real", real_cases(a.data)), ("simulated", simulated_cases(a.data))):
        for name, img, ref in cases:
            pred = np.asarray(seg.cord(img).dataobj) > 0
            d = metrics.dice(pred, ref > 0)
            ratio = float(pred.sum() / max(ref.sum(), 1))
            rows.append(dict(group=group, image=name, dice=float(d), volume_ratio=ratio))
            print(f"{name:28s} {'x'.join(map(str, img.shape)):>10s} {d:6.3f} {ratio:9.2f}", flush=True)
            for t in a.thresholds.split(",") if a.thresholds else ():
                m = np.asarray(seg.cord(img, threshold=float(t)).dataobj) > 0
                rows[-1].setdefault("by_threshold", {})[t] = dict(dice=float(metrics.dice(m, ref > 0)),
                                                                  volume_ratio=float(m.sum() / max(ref.sum(), 1)))
            if a.png:
                _draw(a.png, name, np.asarray(img.dataobj, np.float32), ref, pred)
    for group in ("real", "simulated"):
        sel = [r["dice"] for r in rows if r["group"] == group]
        print(f"median Dice, {group}: {np.median(sel):.3f} over {len(sel)} images (lowest {min(sel):.3f})")
        for t in a.thresholds.split(",") if a.thresholds else ():
            by = [r["by_threshold"][t] for r in rows if r["group"] == group]
            print(f"  threshold {t}: median Dice {np.median([b['dice'] for b in by]):.3f} (lowest "
                  f"{min(b['dice'] for b in by):.3f}), volume ratio {np.median([b['volume_ratio'] for b in by]):.2f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


def _draw(folder, name, data, ref, pred):
    from cordseg.qc import png_bytes

    folder.mkdir(parents=True, exist_ok=True)
    tiles = []
    top = np.percentile(data, 99.5) + 1e-6
    for z in range(data.shape[2]):
        g = (np.clip(data[:, :, z] / top, 0, 1) * 255).astype(np.uint8).T[::-1]
        rgb = np.stack([g] * 3, -1)
        for mask, colour in ((ref, (0, 255, 0)), (pred, (255, 0, 0))):
            m = mask[:, :, z].T[::-1] > 0
            rgb[m & ~ndi.binary_erosion(m)] = colour
        tiles.append(np.kron(rgb, np.ones((4, 4, 1), np.uint8)))
    safe = "".join(c if c.isalnum() else "_" for c in name)
    (folder / f"{safe}.png").write_bytes(png_bytes(np.concatenate(tiles, axis=1)))


if __name__ == "__main__":
    main()
