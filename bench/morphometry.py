"""Cord morphometry: CSA accuracy on synthetic cords of known section, and cordseg's masks against the
reference masks on the labelled real scans.

python bench/morphometry.py [--synthetic] [--real] [--data DIR] [--json FILE]
(neither flag: both parts). Prints Markdown tables; nothing is asserted.

Synthetic: elliptical tubes (semi-axes 5.5 x 4.0 mm, 69.1 mm2) from cordseg.morphometry.tube_phantom,
straight (tilted 0-30 degrees towards azimuth 45, where the toolbox's two-cosine scaling errs most) or
curved (circular arc of radius 120 mm, 0.5 to 30 degrees over 60 mm), binary (voxels at least half inside)
or soft (inside fraction), on 0.5 mm or 1 mm pixels and 0.5-5 mm slices. Columns: error of the mean CSA and
the largest per-slice error, both against pi*a*b; what the toolbox's formula (axial area x cos(angle_AP) x
cos(angle_RL)) would give from the same tangents; the mean CSA after resampling the soft tube to a 0.8 x 0.8
x 2.5 mm grid turned by 8 degrees (linear interpolation, then >= 0.5).

Real: for each labelled scan, cordseg.segment_cord (default model, contrast as given) and its soft map, then
the mean CSA over the whole cord of cordseg's mask, its soft map and the reference mask, and over a fixed
slice range: the central slices covering 15 mm of the reference mask's extent (at least one slice). The
PAM50 levels are not registered to these scans, so this range stands in for the C2-C3 mean that studies
report; it is the same slices for every mask of a scan.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

import cordseg
from cordseg import metrics
from cordseg.io import load_image
from cordseg.morphometry import morphometry, tube_phantom
from cordseg.orientation import to_rpi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.accuracy import CORD_CASES  # noqa: E402

SEMI = (5.5, 4.0)
CASES = CORD_CASES  # image, contrast, reference cord mask: the labelled scans of bench/accuracy.py
RANGE_MM = 15.0


def default_data() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def rpi_grid(shape, zooms):
    sx, sy, sz = zooms
    aff = np.diag([-sx, sy, sz, 1.0])
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    return aff


def resampled(img, shape, affine):
    to_src = np.linalg.inv(img.affine) @ affine
    idx = np.indices(shape).reshape(3, -1).T
    src = nib.affines.apply_affine(to_src, idx).T
    vals = ndi.map_coordinates(np.asarray(img.dataobj, float), src, order=1, mode="constant")
    return (vals.reshape(shape) >= 0.5).astype(np.uint8)


def toolbox_formula(table):
    """Mean of axial area x cos(angle_AP) x cos(angle_RL) over the unflagged slices (same tangents)."""
    vals = []
    for m in table.slices:
        if m.ok:
            a, b = math.radians(m.angle_AP), math.radians(m.angle_RL)
            tz = 1.0 / math.sqrt(1.0 + math.tan(a) ** 2 + math.tan(b) ** 2)
            vals.append(m.area / tz * math.cos(a) * math.cos(b))
    return float(np.mean(vals))


def synthetic(rows_out):
    print("## Synthetic cords (true CSA pi*5.5*4.0 = 69.12 mm2)\n")
    print("| cord | pixel mm | slice mm | tilt deg | mask | mean CSA error | max slice error | toolbox formula "
          "| resampled grid | slices | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rot = np.eye(4)
    c, s = math.cos(math.radians(8)), math.sin(math.radians(8))
    rot[1:3, 1:3] = [[c, -s], [s, c]]
    for kind in ("straight", "curved"):
        for px in (0.5, 1.0):
            for pz in (0.5, 1.0, 3.0, 5.0):
                tilts = (0.0, 10.0, 20.0, 30.0) if kind == "straight" else ("0.5-30",)
                for tilt in tilts:
                    for soft in (False, True):
                        length = 60.0 if kind == "curved" else 40.0
                        nxy = int(round((48.0 if kind == "curved" else 40.0) / px))
                        shape = (nxy, nxy, max(6, int(round(length / pz))))
                        kw = dict(semi_axes=SEMI, azimuth_deg=45.0, soft=soft)
                        if kind == "curved":
                            kw.update(tilt_deg=15.0, curvature_radius=120.0)
                        else:
                            kw.update(tilt_deg=tilt)
                        img, true = tube_phantom(shape, rpi_grid(shape, (px, px, pz)), **kw)
                        t0 = time.perf_counter()
                        table = morphometry(img)
                        secs = time.perf_counter() - t0
                        areas = np.array([m.area for m in table.slices if m.ok])
                        err = 100 * (areas.mean() / true - 1)
                        worst = 100 * np.max(np.abs(areas / true - 1))
                        tb = 100 * (toolbox_formula(table) / true - 1)
                        moved = ""
                        if soft and px == 0.5 and pz == 1.0:
                            gshape = (44, 44, 10)
                            gaff = rot @ rpi_grid(gshape, (0.8, 0.8, 2.5))
                            other = morphometry(nib.Nifti1Image(resampled(img, gshape, gaff), gaff)).mean_area
                            moved = f"{100 * (other / areas.mean() - 1):+.2f}%"
                        n_ok = len(areas)
                        print(f"| {kind} | {px:g} | {pz:g} | {tilt} | {'soft' if soft else 'binary'} | {err:+.2f}% | "
                              f"{worst:.2f}% | {tb:+.2f}% | {moved} | {n_ok}/{len(table.slices)} | {secs:.2f} |")
                        rows_out.append(dict(cord=kind, pixel_mm=px, slice_mm=pz, tilt=tilt, soft=soft,
                                             mean_error_pct=err, max_slice_error_pct=worst,
                                             toolbox_formula_error_pct=tb, resampled=moved, seconds=secs))
    print()


def central_range(table, zooms):
    zs = [m.slice for m in table.slices]
    n = max(1, int(round(RANGE_MM / zooms[2])))
    mid = (zs[0] + zs[-1]) / 2
    lo = int(math.floor(mid - (n - 1) / 2))
    lo = max(zs[0], min(lo, zs[-1] - n + 1))
    return lo, lo + n - 1


def real(data: Path, rows_out):
    print("## Real scans: mean CSA (mm2) from cordseg's mask and from the reference mask\n")
    print("Range: the central slices covering 15 mm of the reference mask (RPI slice indices, inferior to "
          "superior); a fixed stand-in for C2-C3, since no vertebral levels are registered to these scans.\n")
    print("| scan | slices x mm | cord slices ref / cordseg | ref whole | cordseg whole | diff | cordseg soft | "
          "range | ref range | cordseg range | diff | Dice | flagged cordseg/ref | segment s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for img_rel, contrast, ref_rel in CASES:
        img_path, ref_path = data / img_rel, data / ref_rel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            seg = cordseg.segment_cord(str(img_path), contrast=contrast)
            secs = time.perf_counter() - t0
            soft = cordseg.segment_cord(str(img_path), contrast=contrast, soft=True)
        ref_t = morphometry(str(ref_path))
        ours_t = morphometry(seg)
        soft_t = morphometry(soft)
        zooms = ref_t.zooms
        lo, hi = central_range(ref_t, zooms)
        ref_r = morphometry(str(ref_path), slices=(lo, hi)).mean_area
        try:
            ours_r = morphometry(seg, slices=(lo, hi)).mean_area
        except cordseg.CordsegError:
            ours_r = float("nan")
        ref_w, ours_w = ref_t.mean_area, ours_t.mean_area
        ref_rpi, seg_rpi = to_rpi(load_image(str(ref_path))), to_rpi(seg)
        dice = metrics.dice(seg_rpi.data > 0.5, ref_rpi.data > 0.5)
        nflag = (sum(1 for m in ours_t.slices if m.flags), sum(1 for m in ref_t.slices if m.flags))
        name = img_rel.split("/")[-1].replace(".nii.gz", "")
        spans = (f"{ref_t.slices[0].slice}:{ref_t.slices[-1].slice} / "
                 f"{ours_t.slices[0].slice}:{ours_t.slices[-1].slice}")
        print(f"| {name} | {ref_rpi.shape[2]} x {zooms[2]:.2g} | {spans} | {ref_w:.1f} | {ours_w:.1f} | "
              f"{100 * (ours_w / ref_w - 1):+.1f}% | {soft_t.mean_area:.1f} | {lo}:{hi} | {ref_r:.1f} | {ours_r:.1f} | "
              f"{100 * (ours_r / ref_r - 1):+.1f}% | {dice:.3f} | {nflag[0]}/{nflag[1]} | {secs:.1f} |")
        rows_out.append(dict(scan=img_rel, contrast=contrast, ref_whole=ref_w, ours_whole=ours_w,
                             ours_soft_whole=soft_t.mean_area, range=f"{lo}:{hi}", ref_range=ref_r,
                             ours_range=ours_r, dice=dice, flagged_ours=nflag[0], flagged_ref=nflag[1],
                             seg_seconds=secs, ours_slices=f"{ours_t.slices[0].slice}:{ours_t.slices[-1].slice}",
                             ref_slices=f"{ref_t.slices[0].slice}:{ref_t.slices[-1].slice}"))
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="only the synthetic table (with --real: both)")
    ap.add_argument("--real", action="store_true", help="only the real-scan table (with --synthetic: both)")
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = ap.parse_args()
    both = not (a.synthetic or a.real)
    out = {"synthetic": [], "real": []}
    if both or a.synthetic:
        synthetic(out["synthetic"])
    if both or a.real:
        if not (a.data / "README.md").is_file():
            raise SystemExit(f"real data not found at {a.data}")
        real(a.data, out["real"])
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
