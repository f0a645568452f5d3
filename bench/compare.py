"""cordseg's shipped models against the published models (Gros et al. 2019) on every labelled real image.

python bench/compare.py [--data DIR] [--anchors DIR] [--onnx-cache DIR] [--json FILE]

Both sides run through the SAME cordseg pipeline (RPI, resampling, CNN1 heatmap, OptiC, CNN2 patches along
the centerline, back to the native grid) via the API's model arguments: `detect_centerline(model=)`,
`segment_cord(centerline_model=)`, `segment_lesions(model=, centerline_model=)`. The published Keras files in
../shared/anchors are imported on the fly with `training.keras_import` (in a child process, so this process
stays TensorFlow-free like the runtime) into a temporary folder (or --onnx-cache, which must lie outside the
repository): nothing converted from them is ever written into the repository.

Published CNN1 by contrast: t2 -> t2_ctr; t1 -> t2_ctr (the published tool had a t1 CNN1 that is not among
the anchors; t2_ctr runs with its own t2 normalisation); t2s (mt0) -> t2s_ctr; dwi -> dwi_ctr. Published
CNN2-lesion: t2 -> t2_ax_lesion (the published sagittal t2 lesion model is not among the anchors), t2s ->
t2s_lesion; published threshold 0.1. The published cord models (CNN2-SC) were never published: the only
published cord figures are the tool's saved outputs t2_seg-deepseg_sc-2d/-3d (and t2_seg-manual was made by
correcting the 2d one, so that Dice says little).

Metrics (cordseg.metrics): centerline MSE (mm², sub-voxel centerline points vs the per-slice centre of mass
of the reference mask, over the slices that hold both) and localization (reference slices whose centerline
point falls in the mask; a slice without a point counts as a miss); Dice; lesion-wise sensitivity and
precision with the paper's 25% overlap rule; lesions = 3D connected components (26-connectivity).
Seconds: wall time of each API call (whole pipeline from the file), sessions created per call as in the CLI.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cordseg  # noqa: E402
from cordseg import metrics  # noqa: E402
from cordseg.datasets import shared_anchors, shared_data  # noqa: E402
from cordseg.inference import find_model  # noqa: E402
from cordseg.io import load_image  # noqa: E402

PUBLISHED = {  # file stem -> (task, contrasts it is imported for)
    "t2_ctr": ("centerline", "t1,t2"),
    "t2s_ctr": ("centerline", "t2s"),
    "dwi_ctr": ("centerline", "dwi"),
    "t2s_lesion": ("lesion", "t2s"),
    "t2_ax_lesion": ("lesion", "t2"),
}
PUB_CTR = {"t2": "t2_ctr", "t1": "t2_ctr", "t2s": "t2s_ctr", "dwi": "dwi_ctr"}
PUB_LESION = {"t2": "t2_ax_lesion", "t2s": "t2s_lesion"}
PUB_MS_FACTS = "4 lesions, 82 voxels"  # the published tool itself on t2_ms_axial (../shared/FACTS.md)


@dataclass
class Case:
    image: str
    contrast: str
    cord_ref: str | None = None  # cord mask: Dice reference and centerline reference
    ctr_ref: str | None = None  # centerline-only reference (a centerline mask: no localization)
    lesion_ref: str | None = None
    lesion_role: str | None = None  # "labelled", "free" (no lesion), "ms" (real MS scan, unlabelled)
    saved_sc: dict = field(default_factory=dict)  # published tool's saved cord outputs: label -> path
    note: str = ""


CASES = [
    Case("sct_testing/t2/t2.nii.gz", "t2", cord_ref="sct_testing/t2/t2_seg-manual.nii.gz", lesion_role="free",
         saved_sc={"2d": "sct_testing/t2/t2_seg-deepseg_sc-2d.nii.gz",
                   "3d": "sct_testing/t2/t2_seg-deepseg_sc-3d.nii.gz"}),
    Case("sct_testing/t2/t2_fake_lesion.nii.gz", "t2", cord_ref="sct_testing/t2/t2_fake_lesion_sc_seg.nii.gz",
         lesion_ref="sct_testing/t2/t2_fake_lesion_lesion_seg.nii.gz", lesion_role="labelled"),
    Case("sct_testing/t1/t1w.nii.gz", "t1", cord_ref="sct_testing/t1/t1w_seg-manual.nii.gz"),
    Case("sct_testing/mt/mt0.nii.gz", "t2s", cord_ref="sct_testing/mt/mt0_seg.nii.gz", lesion_role="free"),
    Case("sct_testing/dmri/dwi_mean.nii.gz", "dwi", ctr_ref="sct_testing/dmri/dwi_mean_centerline-optic.nii.gz"),
    Case("unf01/sub-unf01_T1w.nii.gz", "t1", cord_ref="unf01/sub-unf01_T1w_seg-manual.nii.gz"),
    Case("unf01/sub-unf01_T2w.nii.gz", "t2", cord_ref="unf01/sub-unf01_T2w_seg-manual.nii.gz", lesion_role="free"),
    Case("unlabeled/t2_ms_axial.nii.gz", "t2", lesion_role="ms"),
]
OPTIC_REFS = [  # (image, contrast, reference, reference is a cord mask, saved published OptiC centerline or None)
    ("sct_testing/t2/t2.nii.gz", "t2", "sct_testing/t2/t2_seg-manual.nii.gz", True,
     "sct_testing/t2/t2_centerline-optic.nii.gz"),
    ("sct_testing/t2/t2.nii.gz", "t2", "sct_testing/t2/t2_centerline-manual.nii.gz", False,
     "sct_testing/t2/t2_centerline-optic.nii.gz"),
    ("sct_testing/t2/t2.nii.gz", "t2", "sct_testing/t2/t2_centerline-optic.nii.gz", False, None),
    ("sct_testing/dmri/dwi_mean.nii.gz", "dwi", "sct_testing/dmri/dwi_mean_centerline-optic.nii.gz", False, None),
]


def default_data() -> Path:
    return shared_data()


def default_anchors() -> Path:
    return shared_anchors()


# ----------------------------------------------------------------------------------------------------
# importing the published models (outside the repository)

def import_published(anchors: Path, out_dir: Path) -> dict:
    """stem -> ONNX path; each .h5 converted by `python -m cordseg.training.keras_import` in a child process."""
    out_dir = out_dir.resolve()
    if out_dir == REPO or REPO in out_dir.parents:
        raise SystemExit(f"refusing to write converted published models inside the repository ({out_dir})")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stem, (task, contrast) in PUBLISHED.items():
        h5, onnx_path = anchors / f"{stem}.h5", out_dir / f"{stem}.onnx"
        if not h5.is_file():
            print(f"  {stem}: {h5} missing, skipped", file=sys.stderr)
            continue
        if not onnx_path.is_file():
            from bench.lesion_eval import import_keras

            t0 = time.perf_counter()
            line = import_keras(h5, onnx_path, task, contrast)
            print(f"  imported {h5.name} ({time.perf_counter() - t0:.0f} s): {line.split(': ', 1)[-1]}",
                  file=sys.stderr)
        paths[stem] = onnx_path
    return paths


# ----------------------------------------------------------------------------------------------------
# running and measuring

def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except cordseg.CordsegError as exc:
        return None, time.perf_counter() - t0, str(exc)
    return out, time.perf_counter() - t0, None


def ref_array(data: Path, rel: str):
    img = load_image(data / rel)
    return np.asarray(img.dataobj) > 0.5, img.affine


def centerline_score(cl, ref_mask, ref_affine, is_mask: bool):
    """(mse mm², localization or None, compared slices, reference slices)."""
    pts = cl.native_points() if cl is not None else np.zeros((0, 3))
    err = metrics.centerline_errors(pts, ref_mask, affine=ref_affine, ref_is_mask=is_mask)
    loc = err.localization_rate if is_mask else None
    return err.mse_mm2, loc, err.n_slices_compared, err.n_slices_ref


def lesion_summary(img) -> tuple[int, int]:
    data = np.asarray(img.dataobj) > 0
    return len(cordseg.lesion_table(img)), int(data.sum())


def lesion_agreement(ours, pub) -> tuple[int, int, int, int]:
    """Without a reference: (our lesions touching a published one, ours, published touching ours, published)."""
    lo, no = metrics.label_lesions(ours)
    lp, npub = metrics.label_lesions(pub)
    ours_hit = len(set(np.unique(lo[pub])) - {0})
    pub_hit = len(set(np.unique(lp[ours])) - {0})
    return ours_hit, no, pub_hit, npub


def run_case(case: Case, data: Path, pub: dict, ours_sc_contrasts, ours_lesion_contrasts) -> dict:
    path = data / case.image
    row = {"image": case.image, "contrast": case.contrast, "pub_ctr": PUB_CTR.get(case.contrast),
           "pub_lesion": PUB_LESION.get(case.contrast) if case.lesion_role else None}
    sides = {"ours": (None, None),
             "pub": (pub.get(PUB_CTR[case.contrast]), pub.get(PUB_LESION.get(case.contrast, ""), None))}
    lesion_masks = {}
    for side, (ctr_model, les_model) in sides.items():
        if side == "pub" and ctr_model is None:
            continue
        res, secs, err = timed(cordseg.detect_centerline, path, case.contrast, model=ctr_model)
        cl = res[1] if res else None
        row[f"{side}_ctr_s"] = secs
        row[f"{side}_ctr_slices"] = 0 if cl is None else len(cl.z)
        if err:
            row[f"{side}_ctr_error"] = err
        ref = case.cord_ref or case.ctr_ref
        if ref:
            mask, aff = ref_array(data, ref)
            mse, loc, n, n_ref = centerline_score(cl, mask, aff, case.cord_ref is not None)
            row.update({f"{side}_ctr_mse": mse, f"{side}_ctr_loc": loc, f"{side}_ctr_compared": f"{n}/{n_ref}"})
        # cord: only ours has a cord model; ours also runs on the published centerline model's output
        if case.cord_ref and case.contrast in ours_sc_contrasts:
            mask, _ = ref_array(data, case.cord_ref)
            seg, secs, err = timed(cordseg.segment_cord, path, case.contrast, centerline_model=ctr_model)
            key = "ours_sc" if side == "ours" else "ours_sc_on_pub_ctr"
            row[f"{key}_dice"] = metrics.dice(np.asarray(seg.dataobj), mask) if seg is not None else 0.0
            row[f"{key}_s"] = secs
            if err:
                row[f"{key}_error"] = err
        if case.lesion_role and (case.contrast in ours_lesion_contrasts if side == "ours" else les_model is not None):
            les, secs, err = timed(cordseg.segment_lesions, path, case.contrast, model=les_model,
                                   centerline_model=ctr_model)
            row[f"{side}_les_s"] = secs
            if les is None:
                row[f"{side}_les_error"] = err
                continue
            n, vox = lesion_summary(les)
            row[f"{side}_les_found"], row[f"{side}_les_voxels"] = n, vox
            lesion_masks[side] = np.asarray(les.dataobj) > 0
            if case.lesion_ref:
                ref, _ = ref_array(data, case.lesion_ref)
                pred = np.asarray(les.dataobj) > 0
                det = metrics.lesion_detection(pred, ref)
                row[f"{side}_les_dice"] = metrics.dice(pred, ref)
                row[f"{side}_les_sens"], row[f"{side}_les_prec"] = det.sensitivity, det.precision
                # how close the model came: its highest probability inside the reference lesion
                soft, _, _ = timed(cordseg.segment_lesions, path, case.contrast, soft=True, model=les_model,
                                   centerline_model=ctr_model)
                if soft is not None:
                    row[f"{side}_les_pmax_in_ref"] = float(np.asarray(soft.dataobj)[ref].max()) if ref.any() else None
                    row[f"{side}_les_threshold"] = find_model("lesion", case.contrast, les_model).threshold
    if case.lesion_role == "ms" and len(lesion_masks) == 2:
        row["ms_agreement"] = lesion_agreement(lesion_masks["ours"], lesion_masks["pub"])
    if case.saved_sc and case.cord_ref:
        mask, _ = ref_array(data, case.cord_ref)
        row["saved_sc_dice"] = {k: metrics.dice(ref_array(data, v)[0], mask) for k, v in case.saved_sc.items()}
    return row


def optic_rows(data: Path, pub: dict) -> list[dict]:
    cache = {}
    rows = []
    for image, contrast, ref, is_mask, saved in OPTIC_REFS:
        mask, aff = ref_array(data, ref)
        row = {"image": image, "reference": ref}
        for side, model in (("ours", None), ("pub", pub.get(PUB_CTR[contrast]))):
            key = (image, side)
            if key not in cache:
                res, _, _ = timed(cordseg.detect_centerline, data / image, contrast, model=model)
                cache[key] = res[1] if res else None
            row[side] = centerline_score(cache[key], mask, aff, is_mask)
        if saved:
            smask, saff = ref_array(data, saved)
            err = metrics.centerline_errors(smask, mask, affine=aff, ref_is_mask=is_mask)
            row["saved"] = (err.mse_mm2, err.localization_rate if is_mask else None, err.n_slices_compared,
                            err.n_slices_ref)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# formatting

def f3(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def pair(row, key, nd=3, missing="-"):
    a, b = row.get(f"ours_{key}"), row.get(f"pub_{key}")
    if a is None and b is None:
        return missing
    return f"{f3(a, nd)} / {f3(b, nd)}"


def ctr_cell(row, side):
    if f"{side}_ctr_mse" not in row:
        return None
    if row.get(f"{side}_ctr_error"):
        return None
    return row[f"{side}_ctr_mse"]


def lesions_cell(row):
    if "ours_les_found" not in row and "pub_les_found" not in row:
        return "-"
    parts = []
    for side in ("ours", "pub"):
        if f"{side}_les_found" in row:
            parts.append(f"{row[f'{side}_les_found']} ({row[f'{side}_les_voxels']} vox)")
        else:
            parts.append(row.get(f"{side}_les_error", "-"))
    return " / ".join(parts)


def main_table(rows) -> str:
    head = ["image", "contrast", "published CNN1 / CNN2-lesion", "centerline MSE mm² ours / pub",
            "localization ours / pub", "cord Dice ours (on pub. centerline)", "cord Dice published tool (saved)",
            "lesion Dice ours / pub", "lesion sens. ours / pub", "lesion prec. ours / pub",
            "lesions found ours / pub", "s centerline ours / pub", "s cord ours", "s lesion ours / pub"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ctr = "-"
        if "ours_ctr_mse" in r or "pub_ctr_mse" in r:
            ctr = f"{f3(ctr_cell(r, 'ours'))} / {f3(ctr_cell(r, 'pub'))}"
            miss = [f"{s}: {r[f'{s}_ctr_compared']} slices" for s in ("ours", "pub")
                    if r.get(f"{s}_ctr_compared")
                    and r[f"{s}_ctr_compared"].split("/")[0] != r[f"{s}_ctr_compared"].split("/")[1]]
            if miss:
                ctr += f" ({'; '.join(miss)})"
        elif r.get("ours_ctr_slices") is not None:
            ctr = f"no reference (cord on {r.get('ours_ctr_slices')} / {r.get('pub_ctr_slices', '-')} slices)"
        loc = pair(r, "ctr_loc")
        if "ours_ctr_mse" in r and r.get("ours_ctr_loc") is None and r.get("pub_ctr_loc") is None:
            loc = "- (centerline reference)"
        cord = "-"
        if "ours_sc_dice" in r:
            cord = f"{f3(r['ours_sc_dice'])} ({f3(r.get('ours_sc_on_pub_ctr_dice'))})"
        saved = ", ".join(f"{k} {f3(v)}" for k, v in r.get("saved_sc_dice", {}).items()) or "-"
        found = lesions_cell(r)
        if "ms" in r["image"]:
            found += f" (published tool: {PUB_MS_FACTS})"
            if r.get("ms_agreement"):
                a, n_a, b, n_b = r["ms_agreement"]
                found += f"; {a} of our {n_a} touch a published one, {b} of its {n_b} touch one of ours"
        pubs = " / ".join(x for x in (r.get("pub_ctr"), r.get("pub_lesion")) if x)
        lines.append("| " + " | ".join([
            r["image"], r["contrast"], pubs, ctr, loc, cord, saved,
            pair(r, "les_dice"), pair(r, "les_sens", 2), pair(r, "les_prec", 2), found,
            pair(r, "ctr_s", 2), f3(r.get("ours_sc_s"), 2), pair(r, "les_s", 2)]) + " |")
    return "\n".join(lines)


def optic_table(rows) -> str:
    def cell(v):
        if v is None:
            return "-"
        mse, loc, n, n_ref = v
        return f"{f3(mse)}" + (f", loc {f3(loc)}" if loc is not None else "") + f" ({n}/{n_ref})"

    lines = ["| image | reference | ours | published CNN1 + cordseg OptiC | published tool's saved OptiC centerline |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image']} | {Path(r['reference']).name} | {cell(r['ours'])} | {cell(r['pub'])} | "
                     f"{cell(r.get('saved'))} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=default_data())
    p.add_argument("--anchors", type=Path, default=default_anchors())
    p.add_argument("--onnx-cache", type=Path, default=None,
                   help="keep the imported published models here between runs (outside the repository)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if not a.data.is_dir():
        raise SystemExit(f"no data folder at {a.data}")
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="cordseg_published_") as tmp:
        print("importing the published models:", file=sys.stderr)
        pub = import_published(a.anchors, a.onnx_cache or Path(tmp))
        ours_sc = set(find_model("sc", None).contrasts)
        ours_lesion = set(find_model("lesion", None).contrasts)
        # warm up onnxruntime and the file cache so the first timed call is not penalised
        cordseg.detect_centerline(a.data / CASES[0].image, "t2")
        rows, t0 = [], time.perf_counter()
        for case in CASES:
            print(f"  {case.image} ...", file=sys.stderr, flush=True)
            rows.append(run_case(case, a.data, pub, ours_sc, ours_lesion))
        orows = optic_rows(a.data, pub)
        total = time.perf_counter() - t0
    print("## cordseg vs the published models (same pipeline)\n")
    print(main_table(rows))
    print("\nours = cordseg's shipped models; pub = the published models imported with `cordseg import-keras` "
          "and run through cordseg's pipeline. Cord: the published cord models were never released, so the "
          "published column is the tool's saved outputs (t2_seg-manual was made by correcting the 2d one); "
          "in brackets, our CNN2 fed by the published CNN1's centerline.")
    free = [r for r, c in zip(rows, CASES) if c.lesion_role == "free"]
    for side, name in (("ours", "ours"), ("pub", "published")):
        flags = [r.get(f"{side}_les_found") == 0 for r in free if f"{side}_les_found" in r]
        if flags:
            print(f"volume-wise specificity on {len(flags)} lesion-free scans, {name}: "
                  f"{sum(flags)}/{len(flags)} = {sum(flags) / len(flags):.2f}")
    for r in rows:
        if "ours_les_pmax_in_ref" in r or "pub_les_pmax_in_ref" in r:
            print(f"{r['image']}: highest lesion probability inside the reference lesion: ours "
                  f"{f3(r.get('ours_les_pmax_in_ref'))} (threshold {f3(r.get('ours_les_threshold'), 2)}), published "
                  f"{f3(r.get('pub_les_pmax_in_ref'))} (threshold {f3(r.get('pub_les_threshold'), 2)})")
    errors = [f"{r['image']} {k}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    for e in errors:
        print(f"note: {e}")
    print("\n## centerlines vs the reference and the published tool's saved OptiC centerlines\n")
    print(optic_table(orows))
    print("\nMSE mm² (slices compared / reference slices); loc = localization, where the reference is a cord mask. "
          "Note t2_centerline-manual is voxel-identical to t2_centerline-optic (MSE 0.000 between them), as "
          "t2_seg-manual is to t2_seg-deepseg_sc-2d.")
    print(f"\n(benchmark wall time {total:.0f} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f})")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "optic": orows}, indent=1, default=float))


if __name__ == "__main__":
    main()
