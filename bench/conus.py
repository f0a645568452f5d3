"""Where the cord mask ends: on the real lumbar scan and on simulated lumbar scans whose conus tip is known.

python bench/conus.py [--sc F.onnx] [--centerline F.onnx] [--n 6] [--json FILE]

Real: unlabeled/t2_lumbar (sagittal T2, 1 mm, R A S). Its conus tip was read by eye on axial reformats as the
last slice where a round cord is seen apart from the nerve roots: native axial slices (third axis) 95-102
(bench/accuracy.py LUMBAR_CONUS_TIP_BY_EYE). Reported: the mask's lowest slice and how far it runs below 95
(the lower bound), in mm.

Simulated (own drawing, no training code): the lower 90 mm of the PAM50 template (cord, CSF, vertebrae), with
a dural sac continued 60 mm below the template, filled with CSF, and 24-40 nerve roots (0.35-0.8 mm radius)
that leave the conus's lower 40 mm and gather towards a point in the back half of the sac, ending on its
floor; filum terminale from the tip. T2-like (CSF bright) or T1-like (CSF dark) intensities, a smooth field
of other tissue, Rician noise; resampled to a 1 mm sagittal grid (R A S, slices left-right), in a random
tilt of up to 8 degrees. The true tip is the lowest slice with cord in the label map. Reported per case: how
far the mask runs past the tip (mm; negative: it stops short), and cord Dice over the slices above the tip.
Bar (issue): within 5 mm.
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

LUMBAR = "unlabeled/t2_lumbar.nii.gz"
TIP_BY_EYE = (95, 102)  # native axial slices of t2_lumbar
BELOW_MM = 60.0


def load_template(data_dir, above_mm=90.0):
    """(cord, csf, bone) booleans of the PAM50 template's lower end at 0.5 mm, in RAS voxel order."""
    folder = data_dir / "labelmaps/PAM50"
    arrays = []
    for name in ("cord", "csf", "spine"):
        img = nib.as_closest_canonical(nib.load(folder / f"PAM50_{name}.nii.gz"))
        arrays.append(np.asarray(img.dataobj) > 0.5)
    cord = arrays[0]
    tip = int(np.nonzero(cord.any((0, 1)))[0].min())
    top = tip + int(above_mm / 0.5)
    return [a[:, :, : top] for a in arrays]


def draw_lumbar(cord, csf, bone, rng):
    """Labels (0 tissue, 1 cord, 2 CSF, 3 bone, 4 roots) at 0.5 mm with the sac and roots below the conus."""
    pad = int(BELOW_MM / 0.5)
    tip = int(np.nonzero(cord.any((0, 1)))[0].min())
    lab = np.zeros(cord.shape[:2] + (cord.shape[2] + pad,), np.uint8)
    lab[:, :, pad:][bone] = 3
    lab[:, :, pad:][csf] = 2
    lab[:, :, pad:][cord] = 1
    tip += pad
    # the sac: the CSF + cord outline 3 mm above where the template's CSF label ends, continued down (the
    # template stops a few mm under the conus), narrowing a little towards the floor
    ref_z = int(np.nonzero((lab == 2).any((0, 1)))[0].min()) + 6
    sac = ndi.binary_closing(np.isin(lab[:, :, ref_z], (1, 2)), iterations=2)
    above = lab.shape[2] - pad  # the vertebrae below the template mirror its lowest ones
    for z in range(ref_z):
        shrink = int(max(0, tip - z) / tip * 3)
        s = ndi.binary_erosion(sac, iterations=shrink) if shrink else sac
        sl = lab[:, :, z]
        if z < pad:
            sl[lab[:, :, pad + (pad - 1 - z) % above] == 3] = 3
        sl[s & (sl != 1)] = 2
    inner = ndi.binary_erosion(sac, iterations=3)
    pts = np.argwhere(inner)
    back = pts[pts[:, 1] <= np.percentile(pts[:, 1], 50)]
    gather = back[rng.integers(len(back))].astype(float)
    xx, yy = np.meshgrid(np.arange(lab.shape[0]), np.arange(lab.shape[1]), indexing="ij")
    cordv = lab == 1
    n_roots = int(rng.integers(24, 41))
    for k in range(n_roots + 1):
        filum = k == n_roots
        z0 = tip if filum else min(int(tip + rng.uniform(0, 80)), lab.shape[2] - 1)
        surface = np.argwhere(cordv[:, :, z0] & ~ndi.binary_erosion(cordv[:, :, z0]))
        start = np.argwhere(cordv[:, :, tip]).mean(0) if filum or not len(surface) else \
            surface[rng.integers(len(surface))].astype(float)
        end = start if filum else gather + rng.normal(0, rng.uniform(2, 6), 2)
        radius = 0.8 if filum else rng.uniform(0.7, 1.6)  # voxels of 0.5 mm
        for z in range(z0, -1, -1):
            t = min(1.0, (z0 - z) / rng.uniform(30, 60)) if not filum else 0.0
            cx, cy = start + (end - start) * t
            disk = ((xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2) & (lab[:, :, z] == 2)
            lab[:, :, z][disk] = 4
    return lab, tip


def render(lab, rng, t1_like):
    """An image of the labels at 1 mm, R A S, slices left-right, with its cord mask at 1 mm."""
    field = ndi.gaussian_filter(rng.normal(0, 1, lab.shape), 16)
    tissue = rng.uniform(0.2, 0.45) * (1 + 0.15 * field / field.std())
    if t1_like:
        means = {1: rng.uniform(0.6, 0.8), 2: rng.uniform(0.05, 0.2), 3: rng.uniform(0.4, 0.7)}
    else:
        means = {1: rng.uniform(0.25, 0.45), 2: rng.uniform(0.8, 1.0), 3: rng.uniform(0.2, 0.5)}
    means[4] = means[1] * rng.uniform(0.9, 1.1)
    img = np.clip(tissue, 0.05, 1.0)
    for k, v in means.items():
        img = np.where(lab == k, v, img)
    angle = np.deg2rad(rng.uniform(-8, 8))
    img = ndi.rotate(img, np.rad2deg(angle), axes=(1, 2), reshape=False, order=1, mode="nearest")
    cord = ndi.rotate((lab == 1).astype(np.float32), np.rad2deg(angle), axes=(1, 2), reshape=False, order=1)
    pool = (lambda a: a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2, : a.shape[2] // 2 * 2]
            .reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean(axis=(1, 3, 5)))
    img, cord = pool(img), pool(cord) >= 0.5
    sigma = rng.uniform(0.02, 0.05)
    img = np.hypot(img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape))
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    out = nib.Nifti1Image((img * 1000).astype(np.float32), aff)
    out.set_qform(aff, 1)
    out.set_sform(aff, 1)
    return out, cord


def lowest(mask):
    zs = np.nonzero(np.asarray(mask).any(axis=(0, 1)))[0]
    return int(zs.min()) if len(zs) else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=shared_data())
    p.add_argument("--sc", type=Path, help="a cord model to measure instead of the installed one")
    p.add_argument("--centerline", type=Path, help="a centerline model to measure instead of the installed one")
    p.add_argument("--conus", type=Path, help="a conus model to measure instead of the installed one")
    p.add_argument("--no-conus", action="store_true", help="without the conus model (the centerline's own end)")
    p.add_argument("--n", type=int, default=6, help="simulated cases")
    p.add_argument("--seed", type=int, default=50)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    seg = cordseg.Segmenter("t2", centerline_model=a.centerline, cord_model=a.sc, conus_model=a.conus,
                            conus=not a.no_conus)
    rows = []
    mask = np.asarray(seg.cord(a.data / LUMBAR).dataobj) > 0
    low = lowest(mask)
    past = None if low is None else TIP_BY_EYE[0] - low  # 1 mm slices
    rows.append(dict(image="t2_lumbar", lowest_slice=low, mm_past_tip=past))
    print(f"t2_lumbar: mask's lowest slice {low}; tip by eye {TIP_BY_EYE[0]}-{TIP_BY_EYE[1]}: "
          f"{past} mm past the tip's lower bound")
    cord, csf, bone = load_template(a.data)
    rng = np.random.default_rng(a.seed)
    print(f"{'case':10s} {'contrast':8s} {'mm past tip':>11s} {'dice above':>10s}")
    for i in range(a.n):
        lab, _ = draw_lumbar(cord, csf, bone, rng)
        t1_like = bool(i % 2)
        img, truth = render(lab, rng, t1_like)
        contrast = "t1" if t1_like else "t2"
        pred = np.asarray(seg.cord(img, contrast=contrast).dataobj) > 0
        tip, low = lowest(truth), lowest(pred)
        past = None if low is None else float(tip - low)  # 1 mm slices
        d = metrics.dice(pred[:, :, tip:], truth[:, :, tip:])
        rows.append(dict(image=f"sim{i}", contrast=contrast, mm_past_tip=past, dice_above=float(d)))
        print(f"sim{i:<7d} {contrast:8s} {past if past is not None else float('nan'):11.0f} {d:10.3f}", flush=True)
    sims = [r["mm_past_tip"] for r in rows[1:] if r["mm_past_tip"] is not None]
    within = sum(abs(v) <= 5 for v in sims)
    print(f"simulated: median {np.median(sims):.0f} mm past the tip; within 5 mm: {within}/{len(rows) - 1}; "
          f"median Dice above the tip {np.median([r['dice_above'] for r in rows[1:]]):.3f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
