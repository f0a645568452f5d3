"""Time of `cordseg.qc.write_report` on a study of 100 images (target: under 30 s on 2 cores).

python bench/qc_report.py [--images 100] [--workers N] [--keep DIR]

The study (written to a temporary folder, never into the repository) is what `cordseg study` leaves: a
BIDS folder of phantom scans (cordseg.phantom.make_phantom) and derivatives/cordseg with the masks, their
JSON sidecars naming the source and a results.tsv. Three kinds of scan, in turn:
- sagittal T2, 0.8 mm isotropic, stored P S R, 96 x 64 x 300 voxels in RPI: 240 mm of cord (60 of its 300
  axial slices shown), cord and 3 lesions;
- axial T2*, 0.5 x 0.5 x 5 mm, 320 x 320 x 15: cord and 2 lesions;
- axial T2, 0.5 x 0.5 x 3 mm, 256 x 256 x 40: cord and centerline.
Three phantoms are made and their files copied under each subject's name, so that every image is read
from its own file. Reported: wall time of write_report (the page and all pictures), per image, and the
report's size, the CPU time of the run (all its threads: the work itself, whatever else runs) and the load
average around it: other jobs on the same 2 cores stretch the wall time, not the CPU time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cordseg import qc  # noqa: E402
from cordseg.phantom import make_phantom  # noqa: E402

KINDS = [
    ("T2w", "acq-sag", dict(shape=(96, 64, 300), zooms=(0.8, 0.8, 0.8), axcodes=("P", "S", "R"), n_lesions=3,
                            seed=1), ("SC", "lesion")),
    ("T2starw", "", dict(shape=(320, 320, 15), zooms=(0.5, 0.5, 5.0), n_lesions=2, seed=2), ("SC", "lesion")),
    ("T2w", "acq-ax", dict(shape=(256, 256, 40), zooms=(0.5, 0.5, 3.0), seed=3), ("SC", "centerline")),
]


def build(root: Path, n_images: int) -> Path:
    bids, deriv = root / "bids", root / "bids" / "derivatives" / "cordseg"
    deriv.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "QC bench", "BIDSVersion": "1.9.0"}))
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "cordseg", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "DatasetLinks": {"raw": "../.."}}))
    templates = root / "templates"
    templates.mkdir()
    for k, (_, _, kw, _) in enumerate(KINDS):
        ph = make_phantom(**kw)
        nib.save(ph.image, templates / f"{k}_image.nii.gz")
        nib.save(ph.cord, templates / f"{k}_SC.nii.gz")
        nib.save(ph.lesions, templates / f"{k}_lesion.nii.gz")
        line = np.zeros(ph.cord.shape, np.uint8)  # one voxel a slice, as the study's centerline
        line[tuple(np.round(ph.centerline.T).astype(int))] = 1
        nib.save(nib.Nifti1Image(line, ph.cord.affine, ph.cord.header), templates / f"{k}_centerline.nii.gz")
    rows = []
    for i in range(n_images):
        k = i % len(KINDS)
        suffix, acq, _, masks = KINDS[k]
        sub = f"sub-{i // len(KINDS) + 1:03d}"
        stem = "_".join(p for p in (sub, acq, suffix) if p)
        rel = f"{sub}/anat/{stem}.nii.gz"
        (bids / sub / "anat").mkdir(parents=True, exist_ok=True)
        (deriv / sub / "anat").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(templates / f"{k}_image.nii.gz", bids / rel)
        for label in masks:
            target = deriv / sub / "anat" / f"{stem}_label-{label}_seg.nii.gz"
            shutil.copyfile(templates / f"{k}_{label}.nii.gz", target)
            (deriv / sub / "anat" / f"{stem}_label-{label}_seg.json").write_text(
                json.dumps({"GeneratedBy": [{"Name": "cordseg"}], "Sources": [f"bids:raw:{rel}"]}))
        rows.append({"image": rel, "subject": sub, "session": "n/a", "suffix": suffix, "status": "ok", "reason": "n/a"})
    with open(deriv / "results.tsv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return deriv


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--workers", type=int, default=None, help="threads drawing pictures (default: one per CPU)")
    ap.add_argument("--keep", type=Path, default=None, help="write the study and report here and keep them")
    args = ap.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="cordseg_qc_bench_"))
    try:
        if args.keep and args.keep.exists():
            shutil.rmtree(args.keep)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        deriv = build(root, args.images)
        print(f"study of {args.images} images written in {time.perf_counter() - t:.1f} s ({root})")
        load = os.getloadavg()[0]
        t, cpu = time.perf_counter(), time.process_time()
        index = qc.write_report(deriv, root / "report", workers=args.workers)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        files = list((root / "report").rglob("*"))
        size = sum(f.stat().st_size for f in files if f.is_file())
        workers = args.workers or os.cpu_count()
        print(f"write_report: {seconds:.1f} s for {args.images} images ({1000 * seconds / args.images:.0f} ms an "
              f"image, {workers} thread(s), {os.cpu_count()} CPUs); report {size / 1e6:.1f} MB in {len(files)} files"
              f" -> {index}")
        print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after"
              + f"; CPU time {cpu:.1f} s ({1000 * cpu / args.images:.0f} ms an image)")
        print("target: < 30 s for 100 images on 2 cores:", "met" if seconds * 100 / args.images < 30 else "NOT met")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
