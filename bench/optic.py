"""OptiC benchmark: the Cython kernel against the NumPy reference on a 768 x 768 x 104 cost
volume (0.5 mm in-plane, 1 mm slices: a 384 x 384 x 52 1 mm image resampled in-plane).

The cost is built the way the pipeline builds it (issue 2, step 2): a CNN1-like heatmap (a
gaussian-blurred curved tube for the cord, a few false-positive blobs off the cord, smooth
noise, no cord on the top slices (brain) nor on the bottom ones), thresholded, and the
Euclidean distance map of the thresholded mask turned into a score: heat - threshold inside
the mask, -distance / 2 mm outside.  Also timed, for reference: the raw heatmap minus the
threshold as the score (a flat negative background, where many more off-cord paths stay
positive), and with --dense a score positive everywhere (no pruning at all: the full 2D
transform on every slice).  Figures are printed, not asserted; the last line is the summary
for the distance-map cost.  Run from the repository root: python bench/optic.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cordseg.optic import optimal_path, optimal_path_reference  # noqa: E402

SPACING = (0.5, 0.5, 1.0)
THRESHOLD = 0.5


def cord_centre(shape):
    nz, nx, ny = shape
    z = np.arange(nz)
    cx = nx / 2 + 0.04 * nx * np.sin(z / 30.0)      # <= ~1 pixel (0.5 mm) per slice
    cy = 0.4 * ny + 0.03 * ny * np.cos(z / 25.0)
    return cx, cy


def make_heatmap(shape=(104, 768, 768), seed=0) -> np.ndarray:
    nz, nx, ny = shape
    rng = np.random.default_rng(seed)
    cx, cy = cord_centre(shape)
    xx = np.arange(nx, dtype=np.float32)[:, None]
    yy = np.arange(ny, dtype=np.float32)[None, :]
    sigma = 6.0                                     # ~3 mm cord radius at 0.5 mm
    blobs = rng.uniform([0, 0], [nx, ny], size=(6, 2))   # false positives off the cord
    # smooth noise: blur a few noise slices once and cycle them (blurring 104 is slow)
    noise = gaussian_filter(rng.normal(0.0, 0.3, (7, nx, ny)).astype(np.float32), (0, 2, 2))
    heat = np.empty(shape, dtype=np.float32)
    for k in range(nz):
        h = np.zeros((nx, ny), dtype=np.float32)
        centres = [(bx, by, 0.7) for bx, by in blobs[(k // 20) % 3 :: 3]]
        if 8 <= k < nz - 6:                         # no cord in the brain nor below the conus
            centres.append((cx[k], cy[k], 1.0))
        for bx, by, amp in centres:                 # gaussians evaluated in a window only
            x0, x1 = max(int(bx) - 30, 0), min(int(bx) + 31, nx)
            y0, y1 = max(int(by) - 30, 0), min(int(by) + 31, ny)
            h[x0:x1, y0:y1] += amp * np.exp(
                -((xx[x0:x1] - bx) ** 2 + (yy[:, y0:y1] - by) ** 2) / (2 * sigma**2))
        shift = 37 * (k // 7)                       # so that reused noise does not repeat
        heat[k] = h + np.roll(noise[k % 7], (shift, 2 * shift), axis=(0, 1))
    return heat


def distance_cost(heat, spacing=SPACING, threshold=THRESHOLD, falloff_mm=2.0) -> np.ndarray:
    """heat - threshold inside the thresholded mask, -distance to it / falloff outside."""
    score = np.empty_like(heat)
    for k in range(heat.shape[0]):
        mask = heat[k] > threshold
        if not mask.any():
            score[k] = -10.0
            continue
        dist = distance_transform_edt(~mask, sampling=spacing[:2])
        score[k] = np.where(mask, heat[k] - threshold, -dist / falloff_mm)
    return score


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def same_path(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return ((a.z_start, a.z_stop) == (b.z_start, b.z_stop) and np.array_equal(a.x, b.x)
            and np.array_equal(a.y, b.y) and abs(a.total - b.total) <= 1e-6 * abs(b.total))


def compare(name, score, lam, repeat, repeat_ref, reference=True):
    optimal_path(score, SPACING, lam)               # warm-up (first touch of fresh memory)
    t_cy, runs, p_cy = timed(lambda: optimal_path(score, SPACING, lam), repeat)
    line = (f"{name}: {100 * (score > 0).mean():.2f}% positive; cython median {t_cy:.3f} s "
            f"(runs {' '.join(f'{t:.3f}' for t in runs)})")
    if p_cy is not None:
        cx, cy = cord_centre(score.shape)
        z = p_cy.z
        err = np.hypot(p_cy.x - cx[z], p_cy.y - cy[z]).max() * SPACING[0]
        line += f"; path slices {p_cy.z_start}..{p_cy.z_stop}, max error {err:.1f} mm"
    if not reference:
        print(line)
        return t_cy, None, None
    t_ref, runs, p_ref = timed(lambda: optimal_path_reference(score, SPACING, lam), repeat_ref)
    same = same_path(p_cy, p_ref)
    print(line + f"; reference {t_ref:.2f} s, speedup {t_ref / t_cy:.0f} x, identical: {same}")
    return t_cy, t_ref, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(104, 768, 768), metavar=("NZ", "NX", "NY"))
    ap.add_argument("--repeat", type=int, default=5, help="Cython runs (median reported)")
    ap.add_argument("--repeat-ref", type=int, default=1, help="reference runs (median)")
    ap.add_argument("--lam", type=float, default=0.2)
    ap.add_argument("--dense", action="store_true", help="also time a score positive everywhere")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    heat = make_heatmap(tuple(args.shape))
    cost = distance_cost(heat)
    print(f"volume {heat.shape} float32, spacing {SPACING} mm, lam {args.lam}; "
          f"built in {time.perf_counter() - t0:.1f} s")

    compare("heatmap - threshold", heat - THRESHOLD, args.lam, args.repeat, args.repeat_ref)
    if args.dense:
        dense = heat - heat.min() + 0.1
        compare("dense (all positive)", dense, args.lam, 3, 0, reference=False)
    t_cy, t_ref, same = compare("distance-map cost", cost, args.lam, args.repeat, args.repeat_ref)
    print(f"optic: cython {t_cy:.3f} s, reference {t_ref:.2f} s, "
          f"speedup {t_ref / t_cy:.0f} x, identical paths: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
