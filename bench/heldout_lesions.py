"""Lesion models on synthetic patches built on a subject that training never saw.

`bench/lesions.py` scores lesion models on lesions written into real scans, and those scans have also
served to choose between finished candidates. This script gives a second, blind signal for that choice:
the training generator (training/synth.py::patch_sample, both lesion styles) draws 48x48x48 patches on the
manual cord/CSF masks of the held-out subject (synth.HELD_OUT_SUBJECTS, never a training anatomy), and
each model is scored on them as the runtime runs it (its own normalisation, mirror-averaged, its threshold).

The shapes, contrasts and intensity profile of the lesions are the training generator's, so the figures
measure how a model carries over to another cord, not to another lesion procedure.

Needs the train extra (the generator). Usage:
    python bench/heldout_lesions.py [--n 96] [--seed 0] [--model F.onnx ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cordseg import metrics
from cordseg.datasets import shared_data
from cordseg.inference import find_model
from cordseg.normalization import centres_from_mask, network_input

BATCH = 8


def heldout_anatomies(labelmaps: Path):
    from cordseg.training import synth

    anatomies = synth.mask_anatomies(labelmaps, held_out=True)
    if not anatomies:
        raise FileNotFoundError(f"no mask of {synth.HELD_OUT_SUBJECTS} under {labelmaps / 'spinegeneric'}")
    return anatomies


def draw_cases(labelmaps: Path, n: int, seed: int):
    """n (image, lesion target) patches, half per lesion style, alternating the held-out anatomies."""
    return draw_cases_with_cords(labelmaps, n, seed)[0]


def draw_cases_with_cords(labelmaps: Path, n: int, seed: int):
    """(draw_cases' patches, the cord mask of each): a model with the cord-anomaly channel needs the latter."""
    from cordseg.training import synth

    anatomies = heldout_anatomies(labelmaps)
    rng = np.random.default_rng(seed)
    styles = [synth.LESION_STYLES["shipped"], synth.LESION_STYLES["faint"]]
    cases, cords = [], []
    for i in range(n):
        image, cord, lesion = synth.patch_sample(anatomies[i % len(anatomies)], rng, shape=(48, 48, 48),
                                                 lesions=True, style=styles[i % 2])
        cases.append((image, lesion > 0.5))
        cords.append(cord > 0.5)
    return cases, cords


def score(model, cases, cords=None):
    """Median Dice over patches with lesions, pooled lesion-wise sensitivity and precision (the paper's
    25% rule), and false lesions on lesion-free patches. `cords`: each patch's cord, where the model takes
    more channels than the image (the centerline through the patch is the cord's centroid)."""
    images = np.stack([c[0] for c in cases]).astype(np.float32)
    channels = tuple(getattr(model, "channels", ("image",)))
    centres = None if cords is None else np.stack([centres_from_mask(c) for c in cords])
    probs = np.empty_like(images)
    for start in range(0, len(images), BATCH):
        part = slice(start, start + BATCH)
        batch = network_input(model.normalisation, images[part], model.normalisation_params, channels=channels,
                              centres=None if centres is None else centres[part])
        probs[part] = model.predict(batch, flip_average=True)
    dices, n_ref, tp_ref, n_pred, tp_pred, free_fp, n_free = [], 0, 0, 0, 0, 0, 0
    for (_, ref), prob in zip(cases, probs):
        pred = prob >= model.threshold
        det = metrics.lesion_detection(pred, ref)
        if ref.any():
            dices.append(metrics.dice(pred, ref))
            n_ref, tp_ref = n_ref + det.n_ref, tp_ref + det.tp_ref
            n_pred, tp_pred = n_pred + det.n_pred, tp_pred + det.tp_pred
        else:
            n_free, free_fp = n_free + 1, free_fp + det.n_pred
    return dict(dice=float(np.median(dices)), sensitivity=(tp_ref, n_ref), precision=(tp_pred, n_pred),
                free_false=(free_fp, n_free))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=96, help="patches (half per lesion style)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labelmaps", type=Path,
                   default=shared_data("labelmaps"))
    p.add_argument("--model", action="append", default=[], help="lesion ONNX file (default: the shipped one)")
    a = p.parse_args(argv)
    t0 = time.time()
    cases, cords = draw_cases_with_cords(a.labelmaps, a.n, a.seed)
    from cordseg.training.synth import HELD_OUT_SUBJECTS

    print(f"{a.n} patches on the masks of {', '.join(HELD_OUT_SUBJECTS)} ({time.time() - t0:.0f} s to draw)")
    print("| model | median Dice | lesion sensitivity | lesion precision | false lesions on lesion-free patches |")
    print("|---|---|---|---|---|")
    for path in a.model or [None]:
        model = find_model("lesion", "t2", path)
        s = score(model, cases, cords)
        (tr, nr), (tp, npred), (ff, nf) = s["sensitivity"], s["precision"], s["free_false"]
        print(f"| {model.path.name} | {s['dice']:.3f} | {tr}/{nr} = {tr / max(nr, 1):.3f} | "
              f"{tp}/{npred} = {tp / max(npred, 1):.3f} | {ff} on {nf} |", flush=True)
    print(f"\nCommand: python bench/heldout_lesions.py --n {a.n} --seed {a.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
