"""Cord Dice on thick-slice versions of the labelled real scans: what a 3-5 mm clinical acquisition of the same
cord gives.

python bench/thick_slices.py [--mm 1,2,3,4,5] [--along lr|si] [--phases] [--sc F.onnx] [--centerline F.onnx]
    [--json FILE]

Each labelled scan of ../shared/data whose cord runs along the image is made thicker along one axis of the
patient: `lr` (default) gives sagittal slices k mm thick, `si` axial ones. A scanner's slice is the signal of
its whole slab, so k mm slices are the means of consecutive blocks of native slices (block size k / native
thickness, rounded; the remainder at the far end is dropped), and the header says the new thickness, with the
slice centre at the middle of its block. The reference mask is averaged over the same blocks and kept where at
least half of the block was cord. Where the slab borders fall against the cord's edges decides whether an edge
slab is cord in the reference (a 12 mm cord spans three or four 3-4 mm slabs), so one placing swings the volume
by a slab's share; `--phases` measures every placing and takes each scan's median over them. Prints per scan
and thickness: Dice, predicted/reference volume, and the median per asked thickness over the scans (and per
subject: the sct_testing scans against unf01's).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

import cordseg
from cordseg import metrics
from cordseg.datasets import shared_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import tta  # noqa: E402

CASES = [  # image, contrast, reference cord mask, subject
    ("sct_testing/t2/t2.nii.gz", "t2", "sct_testing/t2/t2_seg-manual.nii.gz", "sct"),
    ("sct_testing/t2/t2_fake_lesion.nii.gz", "t2", "sct_testing/t2/t2_fake_lesion_sc_seg.nii.gz", "sct"),
    ("sct_testing/t1/t1w.nii.gz", "t1", "sct_testing/t1/t1w_seg-manual.nii.gz", "sct"),
    ("unf01/sub-unf01_T1w.nii.gz", "t1", "unf01/sub-unf01_T1w_seg-manual.nii.gz", "unf01"),
    ("unf01/sub-unf01_T2w.nii.gz", "t2", "unf01/sub-unf01_T2w_seg-manual.nii.gz", "unf01"),
]
PATIENT_AXIS = {"lr": 0, "si": 2}  # RAS index of the patient axis the slices are stacked along


def voxel_axis(img, along):
    """The voxel axis of `img` that runs along the patient axis `along`."""
    codes = nib.aff2axcodes(img.affine)
    letters = {"lr": "LR", "si": "SI"}[along]
    return next(i for i, c in enumerate(codes) if c in letters)


def block_mean(data, axis, k, offset=0):
    """Means of consecutive blocks of k slices along `axis`, the first block starting at slice `offset`
    (the slices before it and a trailing partial block are dropped)."""
    n = (data.shape[axis] - offset) // k
    data = np.moveaxis(np.asarray(data, np.float32), axis, 0)[offset: offset + n * k]
    out = data.reshape(n, k, *data.shape[1:]).mean(axis=1)
    return np.moveaxis(out, 0, axis)


def thicken(img, axis, k, *, mask=False, offset=0):
    """`img` with slices k times thicker along voxel `axis` (slab means; a mask: kept where >= half), the
    first slab starting at native slice `offset`: where the slab borders fall against the cord's edges."""
    data = block_mean(np.asarray(img.dataobj), axis, k, offset)
    if mask:
        data = (data >= 0.5).astype(np.uint8)
    aff = img.affine.copy()
    shift = np.zeros(4)
    shift[axis] = offset + (k - 1) / 2.0  # the new slice centre: the middle of its block
    shift[3] = 1.0
    aff[:, 3] = img.affine @ shift
    aff[:3, axis] = img.affine[:3, axis] * k
    out = nib.Nifti1Image(data, aff)
    out.set_qform(aff, 1)
    out.set_sform(aff, 1)
    return out


def per_scan(rows, image, mm):
    """One figure per scan and thickness: the medians over the slab placings measured (None: none measured)."""
    mine = [r for r in rows if r["image"] == image and r["asked_mm"] == mm]
    if not mine:
        return None
    vols = [r["volume_ratio"] for r in mine]
    return dict(subject=mine[0]["subject"], dice=float(np.median([r["dice"] for r in mine])),
                volume_ratio=float(np.median(vols)), low=min(vols), high=max(vols))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=shared_data())
    p.add_argument("--mm", default="1,2,3,4,5", help="slice thicknesses (mm), comma-separated")
    p.add_argument("--along", choices=sorted(PATIENT_AXIS), default="lr",
                   help="lr: sagittal slices (thick left-right); si: axial slices")
    p.add_argument("--sc", type=Path, help="a cord model to measure instead of the installed one")
    p.add_argument("--centerline", type=Path, help="a centerline model to measure instead of the installed one")
    p.add_argument("--json", type=Path)
    p.add_argument("--tta", default="", help=tta.HELP.format(task="cord"))
    p.add_argument("--phases", action="store_true",
                   help="every placing of the slab borders (first slab starting at native slice 0 .. k-1), each "
                        "reported, with the median over placings per scan; default: the first slab at slice 0")
    a = p.parse_args(argv)
    tta.install(a.tta, "sc")
    warnings.simplefilter("ignore")
    thick = [float(v) for v in a.mm.split(",")]
    segmenters = {}
    rows = []
    print(f"{'image':40s} {'mm':>4s} {'at':>3s} {'shape':>12s} {'dice':>6s} {'vol ratio':>9s} {'seconds':>7s}")
    for img_path, contrast, ref_path, subject in CASES:
        img, ref = nib.load(a.data / img_path), nib.load(a.data / ref_path)
        axis = voxel_axis(img, a.along)
        native = float(img.header.get_zooms()[axis])
        if contrast not in segmenters:
            segmenters[contrast] = cordseg.Segmenter(contrast, centerline_model=a.centerline, cord_model=a.sc)
        seg = segmenters[contrast]
        for mm in thick:
            k = max(1, int(round(mm / native)))
            for offset in range(k if a.phases else 1):
                x, truth = thicken(img, axis, k, offset=offset), thicken(ref, axis, k, mask=True, offset=offset)
                t0 = time.perf_counter()
                pred = np.asarray(seg.cord(x).dataobj) > 0
                secs = time.perf_counter() - t0
                t = np.asarray(truth.dataobj) > 0
                d = metrics.dice(pred, t)
                ratio = float(pred.sum() / max(t.sum(), 1))
                rows.append(dict(image=img_path, subject=subject, asked_mm=mm, mm=round(k * native, 2), k=k,
                                 offset=offset, dice=float(d), volume_ratio=ratio, seconds=secs))
                shape = "x".join(str(s) for s in x.shape)
                print(f"{img_path:40s} {k * native:4.1f} {offset:3d} {shape:>12s} {d:6.3f} {ratio:9.2f} {secs:7.2f}",
                      flush=True)
            if a.phases:
                scan = per_scan(rows, img_path, mm)
                print(f"{img_path:40s} {k * native:4.1f} med {'':>12s} {scan['dice']:6.3f} {scan['volume_ratio']:9.2f}"
                      f"   (range {scan['low']:.2f}-{scan['high']:.2f})", flush=True)
    print()
    print(f"{'mm':>4s} {'median dice':>11s} {'sct':>6s} {'unf01':>6s} {'worst':>6s} {'vol ratios':>20s}")
    for mm in thick:
        sel = [s for s in (per_scan(rows, img_path, mm) for img_path, *_ in CASES) if s]
        if not sel:
            continue
        med = {s: np.median([r["dice"] for r in sel if r["subject"] == s]) for s in ("sct", "unf01")}
        ratios = ",".join(f"{r['volume_ratio']:.2f}" for r in sel)
        print(f"{mm:4.1f} {np.median([r['dice'] for r in sel]):11.3f} {med['sct']:6.3f} {med['unf01']:6.3f} "
              f"{min(r['dice'] for r in sel):6.3f} {ratios:>20s}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
