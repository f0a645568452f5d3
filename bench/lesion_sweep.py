"""Choose the lesion model's threshold and post-processing on the choosing set: the networks run once per case,
then every setting is scored from the kept maps.

    python bench/lesion_sweep.py --set choose [--model F.onnx] [--out sweep.json]

Per case it keeps the lesion map, the cord (cord model along the whole centerline, as the runtime's adaptive
screening segments it; the fixed bars' screening cord stops 20 mm beyond the lesions) and the image, on the
runtime's RPI grid; a setting is threshold -> hysteresis growth -> screening (touch the cord, min contrast)
-> growth to the local edge -> growth to the half-maximum edge, scored on the native grid with
bench/lesion_eval.py's rules. Only the choosing set should be swept; the reporting set is for the chosen one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import lesion_eval, lesion_sets, tta  # noqa: E402


def prepare(cases, model=None, log=print, cache=None, conus=True):
    """[(case, rpi, prob, cord)] with one Segmenter per contrast (maps kept in `cache`, a folder, if given)."""
    import cordseg
    from cordseg import segmentation
    from cordseg.io import load_image
    from cordseg.orientation import to_rpi

    segs, out = {}, []
    for case in cases:
        t0 = time.perf_counter()
        kept = None if cache is None else Path(cache) / f"{case['case']}.npz"
        if kept is not None and kept.exists():
            with np.load(kept) as z:
                rpi = to_rpi(load_image(case["image"]))
                out.append((case, rpi, z["prob"], z["cord"]) if z["prob"].size else (case, None, None, None))
            continue
        if case["contrast"] not in segs:
            segs[case["contrast"]] = cordseg.Segmenter(case["contrast"], lesion_model=model, conus=conus)
        seg = segs[case["contrast"]]
        image = load_image(case["image"])
        try:
            rpi, prob, _, cl = seg._soft_map("lesion", image, case["contrast"], None, None)
        except cordseg.CordsegError as err:
            log(f"  {case['case']}: {err}")
            out.append((case, None, None, None))
            if kept is not None:
                np.savez(kept, prob=np.zeros(0), cord=np.zeros(0))
            continue
        _, cprob, sc, _ = seg._soft_map("sc", image, case["contrast"], cl, None)
        cord = segmentation.keep_largest_component((cprob >= sc.threshold).astype(np.uint8))
        out.append((case, rpi, prob, cord))
        if kept is not None:
            np.savez_compressed(kept, prob=prob.astype(np.float16), cord=cord)
        log(f"  {case['case']}: {time.perf_counter() - t0:.1f} s")
    return out


def apply(rpi, prob, cord, thr, grow, least, fill, measure="slice", edge="0"):
    from cordseg import lesions

    mask = (prob >= thr).astype(np.uint8)
    if grow:
        mask = lesions.grow_lesions(mask, prob, grow)
    if least and mask.any():
        mask = lesions.screen_lesions(mask, rpi.data, cord, least, measure=measure, zooms=rpi.zooms)[0]
    if edge != "0" and mask.any():
        share, low = (float(v) for v in edge.split(":"))
        mask = lesions.grow_to_local_edge(mask, prob, rpi.data, cord, rpi.zooms, share, low)
    if fill and mask.any():
        mask = lesions.fill_to_edge(mask, rpi.data, cord, fill, rpi.zooms)
    return rpi.to_native(mask) > 0


def score(prepared, setting):
    import nibabel as nib

    rows, free = [], []
    for case, rpi, prob, cord in prepared:
        if case["kind"] not in ("lesion", "free"):
            continue
        if rpi is None:
            mask = np.zeros(nib.load(case["image"]).shape[:3], bool)
        else:
            mask = apply(rpi, prob, cord, *setting)
        if case["kind"] == "lesion":
            s = lesion_eval.score_case(mask, np.asarray(nib.load(case["labels"]).dataobj))
            truth = {t["label"]: t for t in case["lesions"]}
            for p in s["lesions"]:
                p["ratio"] = truth[p["label"]]["ratio"]
            rows.append(s)
        else:
            free.append(lesion_eval._components(mask)[1])
    p = lesion_eval.pooled(rows)
    faint = [les for r in rows for les in r["lesions"] if les["ratio"] < 1.4]
    p["faint_found25"] = f"{sum(les['found25'] for les in faint)}/{len(faint)}"
    p["false_lesions_free"] = int(sum(free))
    p["free_scans_with_fp"] = int(sum(n > 0 for n in free))
    p["mean_dice"] = float(np.mean([r["dice"] for r in rows]))
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="choose", choices=sorted(lesion_sets.SETS))
    ap.add_argument("--model", help="lesion model (default: the installed one)")
    ap.add_argument("--thresholds", default="0.3,0.4,0.5")
    ap.add_argument("--grow", default="0,0.25")
    ap.add_argument("--min-contrast", default="1.1,1.15,1.2")
    ap.add_argument("--fill", default="0")
    ap.add_argument("--measure", default="slice", help="what the min contrast is measured against: slice, local "
                    "or adaptive, or several (comma-separated; see cordseg.lesions.screen_lesions)")
    ap.add_argument("--edge", default="0", help="growth to the local edge after screening, SHARE:LOW pairs "
                    "(comma-separated; 0: none; see cordseg.lesions.grow_to_local_edge)")
    ap.add_argument("--out")
    ap.add_argument("--cache", help="keep each case's maps here and reuse them (one folder per model)")
    ap.add_argument("--no-conus", action="store_true",
                    help="keep the centerline's own lower end (Segmenter(conus=False))")
    ap.add_argument("--tta", default="", help=tta.HELP.format(task="lesion"))
    a = ap.parse_args(argv)
    tta.install(a.tta, "lesion")
    if a.cache:
        Path(a.cache).mkdir(parents=True, exist_ok=True)
    index = lesion_sets.build(a.set)
    cases = json.loads(Path(index).read_text())["cases"]
    prepared = prepare([c for c in cases if c["kind"] in ("lesion", "free")], a.model, cache=a.cache,
                       conus=not a.no_conus)
    grid = list(itertools.product(*[[float(v) for v in s.split(",")]
                                    for s in (a.thresholds, a.grow, a.min_contrast, a.fill)], a.measure.split(","),
                                a.edge.split(",")))
    results = []
    print("| thr | grow | min contrast | measure | edge | fill | median Dice | mean Dice | sens 25% | prec 25% "
          "| faint found | F1 10% | FP on free scans |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in grid:
        if setting[1] and setting[1] >= setting[0]:
            continue
        p = score(prepared, setting)
        results.append(dict(setting=setting, **p))
        print(f"| {setting[0]:g} | {setting[1]:g} | {setting[2]:g} | {setting[4]} | {setting[5]} | {setting[3]:g} | "
              f"{p['median_dice']:.3f} | "
              f"{p['mean_dice']:.3f} | {p['found25']}/{p['n_ref']} = {p['sensitivity25']:.2f} | "
              f"{p['tp_pred25']}/{p['n_pred']} = {p['precision25']:.2f} | {p['faint_found25']} | "
              f"{p['f1_10']:.3f} | {p['false_lesions_free']} on {p['free_scans_with_fp']} |", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
