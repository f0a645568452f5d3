"""OptiC benchmark: the Cython kernel against the NumPy reference on a 768 x 768 x 104 score
volume (0.5 mm in-plane, 1 mm slices: a 384 x 384 x 52 1 mm image resampled in-plane).

The score imitates a CNN1 cord heatmap turned into a reward: a gaussian-blurred curved tube
(positive on the cord) minus a threshold, blurred noise, a few false-positive blobs off the
cord, no cord on the top slices (brain) nor on the bottom ones.  Figures printed, not asserted;
the last line is the summary.  Run from the repository root: python bench/optic.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cordseg.optic import optimal_path, optimal_path_reference  # noqa: E402


def make_score(shape=(104, 768, 768), seed=0) -> np.ndarray:
    nz, nx, ny = shape
    rng = np.random.default_rng(seed)
    z = np.arange(nz)
    cx = nx / 2 + 0.04 * nx * np.sin(z / 30.0)      # <= ~1 pixel (0.5 mm) per slice
    cy = 0.4 * ny + 0.03 * ny * np.cos(z / 25.0)
    xx = np.arange(nx, dtype=np.float32)[:, None]
    yy = np.arange(ny, dtype=np.float32)[None, :]
    sigma = 6.0                                     # ~3 mm cord radius at 0.5 mm
    blobs = rng.uniform([0, 0], [nx, ny], size=(6, 2))   # false positives off the cord
    # smooth noise: blur a few noise slices once and cycle them (blurring 104 is slow)
    noise = gaussian_filter(rng.normal(0.0, 0.3, (7, nx, ny)).astype(np.float32), (0, 2, 2))
    score = np.empty(shape, dtype=np.float32)
    for k in range(nz):
        heat = np.zeros((nx, ny), dtype=np.float32)
        centres = [(bx, by, 0.7) for bx, by in blobs[(k // 20) % 3 :: 3]]
        if 8 <= k < nz - 6:                         # no cord in the brain nor below the conus
            centres.append((cx[k], cy[k], 1.0))
        for bx, by, amp in centres:                 # gaussians evaluated in a window only
            x0, x1 = max(int(bx) - 30, 0), min(int(bx) + 31, nx)
            y0, y1 = max(int(by) - 30, 0), min(int(by) + 31, ny)
            heat[x0:x1, y0:y1] += amp * np.exp(
                -((xx[x0:x1] - bx) ** 2 + (yy[:, y0:y1] - by) ** 2) / (2 * sigma**2))
        shift = 37 * (k // 7)                       # so that reused noise does not repeat
        score[k] = heat - 0.3 + np.roll(noise[k % 7], (shift, 2 * shift), axis=(0, 1))
    return score


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(104, 768, 768), metavar=("NZ", "NX", "NY"))
    ap.add_argument("--repeat", type=int, default=5, help="Cython runs (median reported)")
    ap.add_argument("--repeat-ref", type=int, default=1, help="reference runs")
    ap.add_argument("--lam", type=float, default=0.2)
    ap.add_argument("--dense", action="store_true",
                    help="also time the worst case: a score positive everywhere (no pruning)")
    args = ap.parse_args(argv)
    spacing = (0.5, 0.5, 1.0)

    t0 = time.perf_counter()
    score = make_score(tuple(args.shape))
    print(f"score {score.shape} float32, {100 * (score > 0).mean():.2f}% positive, "
          f"built in {time.perf_counter() - t0:.1f} s; spacing {spacing} mm, lam {args.lam}")

    optimal_path(score, spacing, args.lam)          # warm-up (first touch of fresh memory)
    t_cy, runs, p_cy = timed(lambda: optimal_path(score, spacing, args.lam), args.repeat)
    print("cython runs: " + " ".join(f"{t:.3f}" for t in runs) + " s")
    t_ref, runs, p_ref = timed(lambda: optimal_path_reference(score, spacing, args.lam), args.repeat_ref)
    print("reference runs: " + " ".join(f"{t:.2f}" for t in runs) + " s")
    if p_cy is not None:
        print(f"path: slices {p_cy.z_start}..{p_cy.z_stop}, total {p_cy.total:.3f}")
    same = (p_cy is None and p_ref is None) or (
        p_cy is not None and p_ref is not None
        and (p_cy.z_start, p_cy.z_stop) == (p_ref.z_start, p_ref.z_stop)
        and np.array_equal(p_cy.x, p_ref.x) and np.array_equal(p_cy.y, p_ref.y)
        and abs(p_cy.total - p_ref.total) <= 1e-6 * abs(p_ref.total)
    )
    if args.dense:
        dense = score - score.min() + 0.1           # every voxel a positive source
        t_dense, runs, _ = timed(lambda: optimal_path(dense, spacing, args.lam), 3)
        print(f"dense worst case (all positive): cython median {t_dense:.3f} s "
              f"(runs {' '.join(f'{t:.3f}' for t in runs)})")
    print(f"optic: cython {t_cy:.3f} s, reference {t_ref:.2f} s, "
          f"speedup {t_ref / t_cy:.0f} x, identical paths: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
