"""Accuracy of the shipped models on every real image in ../shared/data (none of them seen in training).

python bench/accuracy.py [--data DIR] [--json FILE] [--centerline F.onnx] [--sc F.onnx] [--lesion F.onnx]
Prints one row per image: centerline MSE (mm², sub-voxel points vs the reference mask's per-slice centre of
mass) and localization, cord Dice, lesions found, seconds for the whole cord (or lesion) pipeline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import cordseg
from cordseg import metrics
from cordseg.datasets import shared_data
from cordseg.io import load_image
from cordseg.orientation import to_rpi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import tta  # noqa: E402

CORD_CASES = [  # image, contrast, reference cord mask
    ("sct_testing/t2/t2.nii.gz", "t2", "sct_testing/t2/t2_seg-manual.nii.gz"),
    ("sct_testing/t2/t2_fake_lesion.nii.gz", "t2", "sct_testing/t2/t2_fake_lesion_sc_seg.nii.gz"),
    ("sct_testing/t1/t1w.nii.gz", "t1", "sct_testing/t1/t1w_seg-manual.nii.gz"),
    ("sct_testing/mt/mt0.nii.gz", "t2s", "sct_testing/mt/mt0_seg.nii.gz"),
    ("unf01/sub-unf01_T1w.nii.gz", "t1", "unf01/sub-unf01_T1w_seg-manual.nii.gz"),
    ("unf01/sub-unf01_T2w.nii.gz", "t2", "unf01/sub-unf01_T2w_seg-manual.nii.gz"),
]
CENTERLINE_ONLY = [("sct_testing/dmri/dwi_mean.nii.gz", "dwi", "sct_testing/dmri/dwi_mean_centerline-optic.nii.gz")]
LESION_FREE = ["sct_testing/t2/t2.nii.gz", "unf01/sub-unf01_T2w.nii.gz", "sct_testing/mt/mt0.nii.gz"]
# t2_lumbar (sagittal, RAS): on axial reformats the round cord ends between native slices 95 and 102 (read by
# eye for this bench); below it the dural sac holds only nerve roots.
LUMBAR_CONUS_TIP_BY_EYE = (95, 102)
UNLABELED = [("unlabeled/t2_ms_axial.nii.gz", "t2"), ("unlabeled/t2_lumbar.nii.gz", "t2"),
             ("unlabeled/sub-01_acq-MTon_MTS.nii.gz", "t2s"), ("unlabeled/sub-03_acq-MToff_MTS.nii.gz", "t2s")]


def default_data() -> Path:
    return shared_data()


def centerline_error(cl, ref_path, ref_is_mask=True):
    """MSE (mm²), localization and slice counts of sub-voxel centerline points against a reference cord mask
    (or a reference centerline: ref_is_mask=False, no localization), both in RPI space
    (cordseg.metrics.centerline_errors)."""
    ref = to_rpi(load_image(ref_path))
    e = metrics.centerline_errors(cl.rpi_points, ref.data > 0.5, zooms=ref.zooms, ref_is_mask=ref_is_mask)
    return e.mse_mm2, e.localization_rate, e.n_slices_compared, e.n_slices_ref


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=default_data())
    p.add_argument("--json", type=Path)
    for task in ("centerline", "sc", "lesion"):
        p.add_argument(f"--{task}", type=Path, help=f"a {task} model to measure instead of the installed one")
    p.add_argument("--sc-thresholds", help="also report cord Dice of the soft map thresholded at these values "
                   "(comma-separated, e.g. 0.3,0.5,0.7; the mask itself also keeps the largest component only)")
    p.add_argument("--tta", default="", help=tta.HELP.format(task="cord"))
    a = p.parse_args(argv)
    tta.install(a.tta, "sc")
    ctr = dict(centerline_model=a.centerline)
    warnings.simplefilter("ignore")
    rows = []
    print(f"{'image':42s} {'contrast':8s} {'ctr mse mm2':>11s} {'localized':>10s} {'cord dice':>9s} "
          f"{'vol ratio':>9s} {'seconds':>8s}")
    for img, contrast, ref in CORD_CASES:
        t0 = time.perf_counter()
        _, cl = cordseg.detect_centerline(a.data / img, contrast, model=a.centerline)
        seg = cordseg.segment_cord(a.data / img, contrast, model=a.sc, centerline=cl)
        secs = time.perf_counter() - t0
        mse, loc, n, n_ref = centerline_error(cl, a.data / ref)
        pred, truth = np.asarray(seg.dataobj) > 0, np.asarray(load_image(a.data / ref).dataobj) > 0.5
        d = metrics.dice(pred, truth)
        ratio = pred.sum() / truth.sum()  # predicted / reference volume: > 1 means too wide an outline
        rows.append(dict(image=img, contrast=contrast, centerline_mse_mm2=mse, localization_rate=loc,
                         slices=f"{n}/{n_ref}", dice=d, volume_ratio=float(ratio), seconds=secs))
        print(f"{img:42s} {contrast:8s} {mse:11.3f} {loc:10.3f} {d:9.3f} {ratio:9.2f} {secs:8.2f}")
        if a.sc_thresholds:
            soft = np.asarray(cordseg.segment_cord(a.data / img, contrast, soft=True, model=a.sc,
                                                   centerline=cl).dataobj)
            rows[-1]["dice_by_threshold"] = {t: metrics.dice(soft >= float(t), truth)
                                             for t in a.sc_thresholds.split(",")}
            # two thresholds no user could pick, as bounds on what calibration alone could give: each image's
            # own best, and the one whose mask has the reference's volume
            fine = np.round(np.arange(0.05, 0.96, 0.01), 2)
            best = max((metrics.dice(soft >= t, truth), t) for t in fine)
            n_ref = int(np.asarray(truth).astype(bool).sum())
            matched = min(fine, key=lambda t: abs(int((soft >= t).sum()) - n_ref))
            rows[-1]["dice_oracle"] = dict(best=best[0], best_threshold=float(best[1]),
                                           volume_matched=metrics.dice(soft >= matched, truth),
                                           volume_matched_threshold=float(matched))
    for img, contrast, ref in CENTERLINE_ONLY:
        t0 = time.perf_counter()
        _, cl = cordseg.detect_centerline(a.data / img, contrast, model=a.centerline)
        secs = time.perf_counter() - t0
        mse, _, n, n_ref = centerline_error(cl, a.data / ref, ref_is_mask=False)  # a one-voxel-per-slice line
        rows.append(dict(image=img, contrast=contrast, centerline_mse_mm2=mse, slices=f"{n}/{n_ref}", seconds=secs))
        print(f"{img:42s} {contrast:8s} {mse:11.3f} {f'{n}/{n_ref} sl':>10s} {'-':>9s} {'-':>9s} {secs:8.2f}")
    if a.sc_thresholds:
        sweep = [r["dice_by_threshold"] for r in rows if "dice_by_threshold" in r]
        print("\ncord Dice of the soft map by threshold (per image, then the median):")
        for t in a.sc_thresholds.split(","):
            vals = [d[t] for d in sweep]
            print(f"  {t:>5s}  " + " ".join(f"{v:.3f}" for v in vals) + f"   median {np.median(vals):.3f}")
        oracle = [r["dice_oracle"] for r in rows if "dice_oracle" in r]
        for key, label in (("best", "each image's best"), ("volume_matched", "volume matched")):
            vals = [o[key] for o in oracle]
            thr = " ".join(f"{o[key + '_threshold']:.2f}" for o in oracle)
            print(f"  {label:>17s}: " + " ".join(f"{v:.3f}" for v in vals) + f"   median {np.median(vals):.3f}"
                  f"   (thresholds {thr})")
    print("\nlesion-free scans (lesions reported; 0 expected):")
    for img in LESION_FREE:
        les = cordseg.segment_lesions(a.data / img, "t2s" if "mt0" in img else "t2", model=a.lesion, **ctr)
        n = len(cordseg.lesion_table(les))
        rows.append(dict(image=img, lesions_on_lesion_free=n))
        print(f"  {img:42s} {n}")
    print("\nunlabelled scans (cord slices found / slices; lesions reported, no reference):")
    for img, contrast in UNLABELED:
        t0 = time.perf_counter()
        try:
            _, cl = cordseg.detect_centerline(a.data / img, contrast, model=a.centerline)
            found = f"{len(cl.z)}/{load_image(a.data / img).shape[2] if 'lumbar' not in img else '?'}"
        except cordseg.CordsegError as exc:
            found, cl = str(exc), None
        les = None
        if "lumbar" in img and cl is not None:
            seg = cordseg.segment_cord(a.data / img, contrast, model=a.sc, centerline=cl)
            mask_z = np.nonzero(np.asarray(seg.dataobj).any((0, 1)))[0]
            lo, hi = LUMBAR_CONUS_TIP_BY_EYE
            found += (f"; lowest native slice: centerline {int(np.floor(cl.native_points()[:, 2].min()))}, "
                      f"cord mask {int(mask_z.min()) if len(mask_z) else '-'} (conus tip by eye: {lo}-{hi})")
        if cl is not None and contrast in ("t2", "t2s"):  # the lesion model's contrasts
            les = cordseg.segment_lesions(a.data / img, contrast, model=a.lesion, centerline=cl)
        secs = time.perf_counter() - t0
        extra = ""
        if les is not None:
            tab = cordseg.lesion_table(les)
            extra = f"lesions {len(tab)} ({sum(r.volume_mm3 for r in tab):.0f} mm3)"
        rows.append(dict(image=img, centerline_slices=found, note=extra, seconds=secs))
        print(f"  {img:42s} {found:>8s} {extra} {secs:.2f} s")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
