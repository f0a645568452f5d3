"""Lesion segmentation on the evaluation sets of bench/lesion_sets.py: run, score, report (Markdown).

    python bench/lesion_eval.py --set choose|report [--model [lesion=|centerline=|cord=]F.onnx ...]
        [--threshold T] [--opt key=value ...] [--published] [--json out.json] [--only TEXT]

Each case runs the call `cordseg lesion` makes (cordseg.segment_lesions on the file, with the contrast given
explicitly: t2s for the MT scans and mt0, t2 for the rest), and the mask it returns is scored; a second call
with soft=True gives the unscreened probability map for coverage diagnostics. --opt passes any other keyword
to segment_lesions (numbers are parsed; e.g. --opt min_contrast=0). --published runs the published models
of Gros et al. (2019) from ../shared/anchors instead (CNN1 + CNN2-lesion per contrast: t2s -> t2s_ctr +
t2s_lesion, t2 -> t2_ctr + t2_ax_lesion; threshold 0.1; no screening), converted once with the training
extra's Keras importer into work_tmp/lesion_eval/published (ignored by git, never committed).

Scoring (lesions = 26-connected components of the mask; reference lesions = the labels written by the set):
- Paper rule, the headline: a reference lesion is FOUND when one predicted lesion covers more than 25% of its
  voxels; a predicted lesion is a TRUE POSITIVE when it covers more than 25% of some reference lesion, else a
  false positive (cordseg.metrics.lesion_detection's rule). Sensitivity = found / reference lesions,
  precision = true-positive predicted lesions / predicted lesions, both pooled over the cases.
- F1 at 10%: a reference lesion is found when the mask covers at least 10% of it; a predicted lesion that
  touches no reference lesion is a false positive; F1 = TP / (TP + (FP + FN) / 2), TP = found reference
  lesions, FN = the others.
- Dice per case on voxels (median over lesion cases); covered share per lesion = share of its voxels in the
  mask; false lesions (count, mm3) on each lesion-free case (anything in the mask there is false).
Figures are given for all cases and for the never-seen subjects (sct_testing, sub-03, lumbar and the
grey-matter-bright variants of their scans): training uses only unf01 and sub-01 as real backgrounds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import lesion_sets  # noqa: E402
import tta  # noqa: E402

ANCHORS = REPO.parent / "shared" / "anchors"
PUBLISHED = {  # stem -> (task, contrasts)
    "t2s_ctr": ("centerline", "t2s"),
    "t2_ctr": ("centerline", "t1,t2"),
    "t2s_lesion": ("lesion", "t2s"),
    "t2_ax_lesion": ("lesion", "t2"),
}
PUB_BY_CONTRAST = {"t2s": ("t2s_ctr", "t2s_lesion"), "t2": ("t2_ctr", "t2_ax_lesion")}
PUBLISHED_THRESHOLD = 0.1
SIZE_BANDS = ((0.0, 20.0, "< 20 mm3"), (20.0, 100.0, "20-100 mm3"), (100.0, np.inf, "> 100 mm3"))
RATIO_BANDS = ((0.0, 1.4, "ratio 1.1-1.4"), (1.4, np.inf, "ratio 1.4-2.0"))


# ------------------------------------------------------------------------------------------ scoring


def _components(mask):
    from cordseg import metrics

    return metrics.label_lesions(np.asarray(mask) > 0)


def score_case(pred, ref_labels) -> dict:
    """Scores of one predicted mask against labelled reference lesions (0 = background, k = lesion k; each
    label one lesion). Returns counts under both rules, Dice, and per-lesion covered shares."""
    pred = np.asarray(pred) > 0
    ref_labels = np.asarray(ref_labels).astype(np.int64)
    ids = [int(k) for k in np.unique(ref_labels) if k > 0]
    pl, n_pred = _components(pred)
    sizes = {k: int((ref_labels == k).sum()) for k in ids}
    overlap = np.zeros((n_pred + 1, (max(ids) if ids else 0) + 1), np.int64)
    both = (pl > 0) & (ref_labels > 0)
    np.add.at(overlap, (pl[both], ref_labels[both]), 1)
    per = []
    for k in ids:
        covered = int((pred & (ref_labels == k)).sum())
        best = int(overlap[1:, k].max()) if n_pred else 0
        per.append(dict(label=k, voxels=sizes[k], covered_share=covered / sizes[k],
                        found25=bool(4 * best > sizes[k]), found10=bool(10 * covered >= sizes[k])))
    tp_pred25 = 0
    touching = 0
    for j in range(1, n_pred + 1):
        if any(4 * overlap[j, k] > sizes[k] for k in ids):
            tp_pred25 += 1
        if overlap[j, 1:].any():
            touching += 1
    ref = ref_labels > 0
    denom = int(pred.sum()) + int(ref.sum())
    dice = 2.0 * int((pred & ref).sum()) / denom if denom else 1.0
    tp10 = sum(p["found10"] for p in per)
    return dict(n_ref=len(ids), n_pred=n_pred, found25=sum(p["found25"] for p in per), tp_pred25=tp_pred25,
                fp25=n_pred - tp_pred25, tp10=tp10, fn10=len(ids) - tp10, fp10=n_pred - touching, dice=dice,
                lesions=per)


def f1_10(tp, fp, fn) -> float:
    """Lesion-wise F1 of the 10% rule: TP / (TP + (FP + FN) / 2); nan when there is nothing at all."""
    den = tp + 0.5 * (fp + fn)
    return tp / den if den else float("nan")


def ratio(a, b) -> float:
    return a / b if b else float("nan")


def pooled(rows) -> dict:
    """Pooled counts over scored lesion cases."""
    keys = ("n_ref", "n_pred", "found25", "tp_pred25", "fp25", "tp10", "fn10", "fp10")
    s = {k: sum(r[k] for r in rows) for k in keys}
    s["sensitivity25"] = ratio(s["found25"], s["n_ref"])
    s["precision25"] = ratio(s["tp_pred25"], s["n_pred"])
    s["f1_10"] = f1_10(s["tp10"], s["fp10"], s["fn10"])
    s["median_dice"] = float(np.median([r["dice"] for r in rows])) if rows else float("nan")
    return s


# ------------------------------------------------------------------------------------------ running


def import_published(out_dir: Path, anchors: Path = ANCHORS, log=print) -> dict:
    """stem -> ONNX path, converted once by the training extra's Keras importer in a child process."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stem, (task, contrast) in PUBLISHED.items():
        h5, onnx_path = anchors / f"{stem}.h5", out_dir / f"{stem}.onnx"
        if not onnx_path.is_file():
            if not h5.is_file():
                raise SystemExit(f"{h5} not found")
            t0 = time.perf_counter()
            import_keras(h5, onnx_path, task, contrast)
            log(f"imported {h5.name} in {time.perf_counter() - t0:.0f} s")
        paths[stem] = onnx_path
    return paths


def import_keras(h5: Path, onnx_path: Path, task: str, contrast: str) -> str:
    """One published Keras model as a cordseg ONNX model, in a child process (the training extra's importer);
    returns the importer's last line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "cordseg.training.keras_import", str(h5), "--task", task,
                           "--contrast", contrast, "-o", str(onnx_path)], cwd=str(REPO), env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not onnx_path.is_file():
        raise SystemExit(f"import of {h5.name} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def parse_value(text: str):
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_case(case: dict, kwargs: dict, soft_map=True):
    """(mask bool array, soft float array or None, seconds of the mask call, error text or None)."""
    import cordseg
    import nibabel as nib

    t0 = time.perf_counter()
    try:
        mask = cordseg.segment_lesions(case["image"], case["contrast"], **kwargs)
    except cordseg.CordsegError as err:
        shape = nib.load(case["image"]).shape[:3]
        return np.zeros(shape, bool), None, time.perf_counter() - t0, str(err)
    secs = time.perf_counter() - t0
    if not soft_map:
        return np.asarray(mask.dataobj) > 0, None, secs, None
    soft_kw = {k: v for k, v in kwargs.items() if k != "min_contrast"}
    soft = np.asarray(cordseg.segment_lesions(case["image"], case["contrast"], soft=True, **soft_kw).dataobj,
                      np.float32)
    return np.asarray(mask.dataobj) > 0, soft, secs, None


def model_kwargs(a, case, pub) -> dict:
    kw = dict(a.opts)
    if pub:
        ctr, les = PUB_BY_CONTRAST[case["contrast"]]
        kw.update(model=str(pub[les]), centerline_model=str(pub[ctr]), threshold=PUBLISHED_THRESHOLD)
    for role, path in a.models.items():
        kw[{"lesion": "model", "centerline": "centerline_model", "cord": "cord_model"}[role]] = path
    if a.threshold is not None:
        kw["threshold"] = a.threshold
    return kw


def evaluate(a, log=print) -> dict:
    import nibabel as nib

    index = lesion_sets.build(a.set, a.data, a.out)
    meta = json.loads(Path(index).read_text())
    cases = [c for c in meta["cases"] if a.only is None or a.only in c["case"]]
    if a.shard:
        i, n = (int(v) for v in a.shard.split("/"))
        cases = cases[i - 1::n]
    pub = import_published(a.out / "published", a.anchors, log) if a.published else None
    results = []
    for case in cases:
        kw = model_kwargs(a, case, pub)
        mask, soft, secs, err = run_case(case, kw, not a.no_soft)
        img = nib.load(case["image"])
        vox = float(np.prod(img.header.get_zooms()[:3]))
        row = dict(case=case["case"], kind=case["kind"], background=case["background"], subject=case["subject"],
                   never_seen=case["never_seen"], contrast=case["contrast"], seconds=secs, error=err)
        if case["kind"] == "lesion":
            ref = np.asarray(nib.load(case["labels"]).dataobj)
            s = score_case(mask, ref)
            truth = {t["label"]: t for t in case["lesions"]}
            for p in s["lesions"]:
                t = truth[p["label"]]
                m = ref == p["label"]
                p.update(volume_mm3=t["volume_mm3"], ratio=t["ratio"], slices=t["slices"],
                         soft_peak=float(soft[m].max()) if soft is not None else None,
                         soft_share50=float((soft[m] >= 0.5).mean()) if soft is not None else None)
            row.update(s)
        else:
            _, n = _components(mask)
            row.update(false_lesions=n, false_mm3=float(mask.sum()) * vox,
                       soft_max=float(soft.max()) if soft is not None else None)
        results.append(row)
        log(f"  {case['case']}: " + (f"Dice {row['dice']:.2f}, found {row['found25']}/{row['n_ref']}, "
                                     f"pred {row['n_pred']}" if case["kind"] == "lesion" else
                                     f"{row['false_lesions']} lesions, {row['false_mm3']:.0f} mm3")
            + f", {secs:.1f} s" + (f" [{err}]" if err else ""))
    return dict(set=a.set, seed=meta["seed"], procedure=meta["procedure"], published=bool(a.published),
                kwargs={k: str(v) for k, v in model_kwargs(a, cases[0], pub).items()} if cases else {},
                cases=results, truth={c["case"]: c for c in cases})


# ------------------------------------------------------------------------------------------ report


def _f(v, spec=".2f"):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def summary(results, subset=None) -> dict:
    rows = [r for r in results if subset is None or subset(r)]
    les = [r for r in rows if r["kind"] == "lesion"]
    free = [r for r in rows if r["kind"] == "free"]
    s = pooled(les)
    s.update(cases=len(les), free=len(free), free_with_false=sum(r["false_lesions"] > 0 for r in free),
             false_lesions=sum(r["false_lesions"] for r in free), false_mm3=sum(r["false_mm3"] for r in free),
             seconds=float(np.median([r["seconds"] for r in rows if r["kind"] != "ms"])) if rows else float("nan"))
    return s


def lesion_rows(results, subset=None):
    out = []
    for r in results:
        if r["kind"] == "lesion" and (subset is None or subset(r)):
            out += [dict(p, case=r["case"], background=r["background"], never_seen=r["never_seen"])
                    for p in r["lesions"]]
    return out


def report(res: dict, command: str) -> str:
    results = res["cases"]
    seen = (lambda r: r["never_seen"])
    lines = [f"# Lesion evaluation: {res['set']} set (procedure \"{res['procedure']}\", seed {res['seed']})", "",
             f"Models: {'published (Gros et al. 2019), threshold 0.1' if res['published'] else 'cordseg'}; "
             f"segment_lesions options: {res['kwargs'] or 'defaults'}", f"Command: `{command}`", ""]
    lines += ["## Headline", "",
              "| subset | cases | lesions | median Dice | sensitivity (>25%) | precision (>25%) | F1 (>=10%) | "
              "lesion-free cases with a false lesion | false lesions (mm3) | s per scan |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, sub in (("all", None), ("never-seen subjects", seen)):
        s = summary(results, sub)
        lines.append(f"| {name} | {s['cases']} | {s['n_ref']} | {_f(s['median_dice'])} | "
                     f"{s['found25']}/{s['n_ref']} = {_f(s['sensitivity25'])} | "
                     f"{s['tp_pred25']}/{s['n_pred']} = {_f(s['precision25'])} | {_f(s['f1_10'])} | "
                     f"{s['free_with_false']} of {s['free']} | {s['false_lesions']} ({s['false_mm3']:.0f}) | "
                     f"{_f(s['seconds'], '.1f')} |")
    lines += ["", "## By lesion size and brightness (reference lesions)", "",
              "| band | lesions | found >25% | found >=10% | median covered share | never-seen: found >25% |",
              "|---|---|---|---|---|---|"]
    allles = lesion_rows(results)
    for lo, hi, name in SIZE_BANDS:
        _band_line(lines, name, allles, lambda p, lo=lo, hi=hi: lo <= p["volume_mm3"] < hi)
    for lo, hi, name in RATIO_BANDS:
        _band_line(lines, name, allles, lambda p, lo=lo, hi=hi: lo <= p["ratio"] < hi)
    lines += ["", "## Per scan (background)", "",
              "| background | subject | cases | lesions | found >25% | predicted | false positives (>25%) | "
              "median Dice | s |", "|---|---|---|---|---|---|---|---|---|"]
    for bg in dict.fromkeys(r["background"] for r in results if r["kind"] == "lesion"):
        rows = [r for r in results if r["background"] == bg and r["kind"] == "lesion"]
        p = pooled(rows)
        lines.append(f"| {bg} | {rows[0]['subject']}{'' if rows[0]['never_seen'] else ' (seen)'} | {len(rows)} | "
                     f"{p['n_ref']} | {p['found25']} | {p['n_pred']} | {p['fp25']} | {_f(p['median_dice'])} | "
                     f"{np.mean([r['seconds'] for r in rows]):.1f} |")
    lines += ["", "## Lesion-free cases (any lesion is false)", "",
              "| case | subject | false lesions | mm3 | max probability | s |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] == "free":
            lines.append(f"| {r['background']} | {r['subject']} | {r['false_lesions']} | {r['false_mm3']:.1f} | "
                         f"{_f(r['soft_max'])} | {r['seconds']:.1f} |")
    for r in results:
        if r["kind"] == "ms":
            lines += ["", f"Real MS scan (t2_ms_axial, no reference): {r['false_lesions']} lesions, "
                          f"{r['false_mm3']:.0f} mm3 ({r['seconds']:.1f} s)."]
    lines += ["", "## Per case", "", "| case | lesions | Dice | found >25% | predicted | FP (>25%) | FP (touching "
              "nothing) | s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] == "lesion":
            lines.append(f"| {r['case']} | {r['n_ref']} | {r['dice']:.2f} | {r['found25']} | {r['n_pred']} | "
                         f"{r['fp25']} | {r['fp10']} | {r['seconds']:.1f} |" + (f" {r['error']}" if r['error'] else ""))
    lines += ["", "## Every lesion", "",
              "| case | lesion | mm3 | slices | ratio | covered share | found >25% | found >=10% | soft peak | "
              "soft >= 0.5 share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in allles:
        lines.append(f"| {p['case']} | {p['label']} | {p['volume_mm3']:.0f} | {p['slices']} | {p['ratio']:.2f} | "
                     f"{p['covered_share']:.2f} | {'yes' if p['found25'] else 'no'} | "
                     f"{'yes' if p['found10'] else 'no'} | {_f(p['soft_peak'])} | {_f(p['soft_share50'])} |")
    r_ = np.array([p["ratio"] for p in allles])
    v_ = np.array([p["volume_mm3"] for p in allles])
    if len(r_):
        lines += ["", f"Realised brightness ratio: min {r_.min():.2f}, quartiles "
                      f"{np.percentile(r_, 25):.2f} / {np.median(r_):.2f} / {np.percentile(r_, 75):.2f}, max "
                      f"{r_.max():.2f}; {(r_ < 1.4).sum()} of {len(r_)} below 1.4. Volume: min {v_.min():.0f}, median "
                      f"{np.median(v_):.0f}, max {v_.max():.0f} mm3."]
    return "\n".join(lines)


def load_runs(paths: str) -> dict:
    """Earlier --json outputs (comma-separated shards of one run) joined into one result."""
    runs = [json.loads(Path(f).read_text()) for f in paths.split(",")]
    out = dict(runs[0])
    out["cases"] = [c for r in runs for c in r["cases"]]
    out["command"] = " + ".join(r.get("command", "?") for r in runs)
    return out


def compact(results_by_name: dict) -> str:
    """One table of headline, band and lesion-free figures, a column per run (name -> evaluate() result)."""
    names = list(results_by_name)
    rows = []
    for sub_name, sub in (("all", None), ("never-seen", lambda r: r["never_seen"])):
        ss = {n: summary(results_by_name[n]["cases"], sub) for n in names}
        rows.append((f"{sub_name}: median Dice", [_f(ss[n]["median_dice"]) for n in names]))
        rows.append((f"{sub_name}: sensitivity (>25%)",
                     [f"{ss[n]['found25']}/{ss[n]['n_ref']} = {_f(ss[n]['sensitivity25'])}" for n in names]))
        rows.append((f"{sub_name}: precision (>25%)",
                     [f"{ss[n]['tp_pred25']}/{ss[n]['n_pred']} = {_f(ss[n]['precision25'])}" for n in names]))
        rows.append((f"{sub_name}: F1 (>=10%)", [_f(ss[n]["f1_10"]) for n in names]))
        rows.append((f"{sub_name}: lesion-free cases with a false lesion",
                     [f"{ss[n]['free_with_false']} of {ss[n]['free']} ({ss[n]['false_lesions']} lesions, "
                      f"{ss[n]['false_mm3']:.0f} mm3)" for n in names]))
    for lo, hi, band in RATIO_BANDS + SIZE_BANDS:
        cells = []
        for n in names:
            les = lesion_rows(results_by_name[n]["cases"])
            key = "ratio" if band.startswith("ratio") else "volume_mm3"
            g = [p for p in les if lo <= p[key] < hi]
            share = np.median([p["covered_share"] for p in g]) if g else 0.0
            cells.append(f"{sum(p['found25'] for p in g)}/{len(g)} (covered {share:.2f})" if g else "-")
        rows.append((f"found (>25%), {band} (median covered share)", cells))
    rows.append(("median s per scan", [_f(summary(results_by_name[n]["cases"])["seconds"], ".1f") for n in names]))
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def _band_line(lines, name, les, sel):
    g = [p for p in les if sel(p)]
    ns = [p for p in g if p["never_seen"]]
    if not g:
        lines.append(f"| {name} | 0 | - | - | - | - |")
        return
    lines.append(f"| {name} | {len(g)} | {sum(p['found25'] for p in g)}/{len(g)} | "
                 f"{sum(p['found10'] for p in g)}/{len(g)} | {np.median([p['covered_share'] for p in g]):.2f} | "
                 f"{sum(p['found25'] for p in ns)}/{len(ns)} |")


def _strict(obj):
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", choices=sorted(lesion_sets.SETS))
    p.add_argument("--compact", nargs="+", metavar="NAME=JSON",
                   help="print one compact table from earlier --json outputs (no run)")
    p.add_argument("--model", action="append", default=[], metavar="[ROLE=]ONNX",
                   help="lesion=F.onnx (or F.onnx), centerline=F.onnx, cord=F.onnx (the screening's cord model)")
    p.add_argument("--threshold", type=float)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other keyword of cordseg.segment_lesions, e.g. min_contrast=0")
    p.add_argument("--published", action="store_true", help="the published models instead of cordseg's")
    p.add_argument("--json", type=Path)
    p.add_argument("--no-soft", action="store_true", help="skip the soft map (no peak-probability diagnostics; "
                   "halves the time)")
    p.add_argument("--only", help="only cases whose id contains this text")
    p.add_argument("--shard", metavar="I/N", help="only every N-th case starting at the I-th (1-based), to run "
                   "a set in N processes; join the JSONs with --compact NAME=A.json,B.json or --report")
    p.add_argument("--report", metavar="JSON[,JSON...]", help="print the full report of earlier --json "
                   "output(s) (shards joined; no run)")
    p.add_argument("--data", type=Path, default=lesion_sets.DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=lesion_sets.DEFAULT_OUT)
    p.add_argument("--anchors", type=Path, default=ANCHORS)
    p.add_argument("--tta", default="", help=tta.HELP.format(task="lesion"))
    a = p.parse_args(argv)
    tta.install(a.tta, "lesion")
    if a.compact:
        runs = dict(x.split("=", 1) for x in a.compact)
        print(compact({n: load_runs(f) for n, f in runs.items()}))
        return 0
    if a.report:
        res = load_runs(a.report)
        print(report(res, res.get("command", "?")))
        return 0
    if not a.set:
        p.error("--set is required")
    a.models = {}
    for m in a.model:
        role, path = m.split("=", 1) if "=" in m else ("lesion", m)
        if role not in ("lesion", "centerline", "cord"):
            p.error(f"--model role must be lesion, centerline or cord, not {role!r}")
        a.models[role] = path
    a.opts = {}
    for o in a.opt:
        if "=" not in o:
            p.error(f"--opt wants key=value, got {o!r}")
        k, v = o.split("=", 1)
        a.opts[k.strip()] = parse_value(v.strip())
    warnings.simplefilter("ignore")
    res = evaluate(a, log=lambda m: print(m, file=sys.stderr, flush=True))
    command = "python bench/lesion_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(report(res, command))
    if a.json:
        res["command"] = command
        a.json.write_text(json.dumps(_strict(res), indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
