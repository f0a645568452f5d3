"""OptiC: the globally optimal cord centerline through a score volume.

Maximises, over contiguous slice ranges a..b and integer in-plane positions (x_z, y_z),

    sum_{z=a..b} score[z, x_z, y_z]
      - lam * sum_{z=a+1..b} ((x_z - x_{z-1})^2 sx^2 + (y_z - y_{z-1})^2 sy^2) / sz

by exact dynamic programming over slices.  The running value on slice z is
score[z] + max(0, best transition from slice z-1), so a path may start on any slice, and the
answer is the best running value over all slices, so it may stop on any slice.  Each
transition is a 2D generalised distance transform for the quadratic penalty (Felzenszwalb &
Huttenlocher), separable into one pass along y and one along x, O(voxels) per volume.

The Cython kernel (cordseg._optic) is used by default.  ``optimal_path_reference`` is a plain
NumPy implementation of the same recurrence with the same float64 operations and tie rule
(smaller index wins; a path continues only on a strictly positive transition; the end is the
first maximum in (z, x, y) order), so both return identical paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np

__all__ = ["OpticPath", "optimal_path", "optimal_path_reference"]


@dataclass(frozen=True, eq=False)
class OpticPath:
    """One centre per slice for slices z_start..z_stop (inclusive); total is the objective."""

    z_start: int
    z_stop: int
    x: np.ndarray
    y: np.ndarray
    total: float

    @property
    def z(self) -> np.ndarray:
        return np.arange(self.z_start, self.z_stop + 1)

    def __len__(self) -> int:
        return self.z_stop - self.z_start + 1


def _validate(score, spacing, lam, *, check_finite=True):
    """Return (score as C-contiguous float32 (nz, nx, ny), wx, wy) or raise ValueError.
    check_finite=False leaves the NaN / Inf check of float32 input to the kernel, which
    makes it in the sweep it does anyway."""
    arr = np.asarray(score)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"score must be a real numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError("score must be real, got a complex array")
    if arr.ndim != 3:
        raise ValueError(f"score must be 3D (nz, nx, ny), got shape {arr.shape}")
    if min(arr.shape) < 1:
        raise ValueError(f"score has an empty dimension: shape {arr.shape}")
    if arr.shape[1] * arr.shape[2] >= 2**31 - 1:
        raise ValueError(f"axial slices too large: {arr.shape[1]} x {arr.shape[2]}")
    if arr.dtype.kind == "f" and (check_finite or arr.dtype != np.float32):
        lo, hi = float(arr.min()), float(arr.max())    # NaN propagates, Inf shows
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("score contains NaN or Inf")
        big = float(np.finfo(np.float32).max)
        if lo < -big or hi > big:
            raise ValueError("score has values beyond the float32 range")
    arr = np.ascontiguousarray(arr, dtype=np.float32)

    try:
        sp = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three numbers (sx, sy, sz), got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive finite numbers (sx, sy, sz), got {spacing!r}")

    if isinstance(lam, bool) or not isinstance(lam, (Real, np.integer, np.floating)):
        raise ValueError(f"lam must be a real number, got {lam!r}")
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    sx, sy, sz = sp
    wx = lam * sx * sx / sz
    wy = lam * sy * sy / sz
    if not (math.isfinite(wx) and math.isfinite(wy)):
        raise ValueError(f"lam * spacing^2 overflows: lam={lam!r}, spacing={spacing!r}")
    return arr, wx, wy


def _backtrack(ny, best, z, x, y, regions, bps) -> OpticPath | None:
    """Follow the backpointers from the best end.  bps[z] covers the box regions[z] =
    [x0, x1, y0, y1] of slice z (None: no box); outside it every pixel starts fresh."""
    if not best > 0:
        return None
    xs, ys = [int(x)], [int(y)]
    z_stop = z = int(z)
    while True:
        x0, x1, y0, y1 = (int(t) for t in regions[z])
        cx, cy = xs[-1], ys[-1]
        if bps[z] is None or not (x0 <= cx <= x1 and y0 <= cy <= y1):
            break
        b = int(bps[z][cx - x0, cy - y0])
        if b == 0:
            break
        z -= 1
        qx, qy = divmod(b - 1, ny)
        xs.append(qx)
        ys.append(qy)
    return OpticPath(
        z_start=z,
        z_stop=z_stop,
        x=np.array(xs[::-1], dtype=np.intp),
        y=np.array(ys[::-1], dtype=np.intp),
        total=float(best),
    )


def optimal_path(score, spacing, lam, *, use_reference=False) -> OpticPath | None:
    """Globally optimal centerline through ``score`` (nz, nx, ny), slice-major.

    score: reward of the cord centre at (x, y) on slice z (positive where the cord is likely,
    negative elsewhere); converted to float32.  spacing: (sx, sy, sz) in mm.  lam >= 0 weighs
    squared in-plane displacement (mm^2) per mm of slice thickness.
    Returns None when no path has a positive total (no cord).  Raises ValueError on bad input.
    """
    if use_reference:
        return optimal_path_reference(score, spacing, lam)
    arr, wx, wy = _validate(score, spacing, lam, check_finite=False)
    try:
        from cordseg._optic import optic_dp
    except ImportError as exc:  # a source checkout that was never built
        raise ImportError(
            "the OptiC extension cordseg._optic is not built: install with `pip install .` "
            "or run `python setup.py build_ext --inplace`") from exc
    return _backtrack(arr.shape[2], *optic_dp(arr, wx, wy))


def optimal_path_reference(score, spacing, lam) -> OpticPath | None:
    """Plain NumPy implementation of the same recurrence (for tests and benchmarks)."""
    arr, wx, wy = _validate(score, spacing, lam)
    return _backtrack(arr.shape[2], *_dp_reference(arr, wx, wy))


# ---------------------------------------------------------------- NumPy reference
def _envelope_lines(f: np.ndarray, w: float):
    with np.errstate(over="ignore"):     # extreme lam: +-inf behaves as the kernel's
        return _envelope_lines_(f, w)


def _envelope_lines_(f: np.ndarray, w: float):
    """1D transform of every row of f (L, n): val[l, p] = max_q f[l, q] - w (p - q)^2 over
    sources with f > 0 (val -inf, arg -1 where a row has none).  Same operations as the Cython
    kernel: the envelopes are built for all rows at once, one source column at a time."""
    L, n = f.shape
    val = np.full((L, n), -np.inf)
    arg = np.full((L, n), -1, dtype=np.int64)
    pos = f > 0
    lines = np.flatnonzero(pos.any(axis=1))
    m = lines.size
    if m == 0:
        return val, arg
    fl = f[lines]
    pl = pos[lines]
    if w == 0.0:
        a = np.where(pl, fl, -np.inf).argmax(axis=1)
        val[lines] = fl[np.arange(m), a][:, None] - 0.0
        arg[lines] = a[:, None]
        return val, arg

    v = np.zeros((m, n), dtype=np.int64)
    zb = np.full((m, n), np.inf)
    k = np.full(m, -1, dtype=np.int64)
    for q in np.flatnonzero(pl.any(axis=0)):
        pend = np.flatnonzero(pl[:, q])
        fq = fl[pend, q]
        while pend.size:
            kk = k[pend]
            has = kk >= 0
            s = np.full(pend.size, -np.inf)
            pop = np.zeros(pend.size, dtype=bool)
            if has.any():
                ph, kh = pend[has], kk[has]
                vk = v[ph, kh]
                s[has] = ((fl[ph, vk] - fq[has]) / (w * (q - vk).astype(np.float64))
                          + (q + vk).astype(np.float64)) * 0.5
                pop[has] = s[has] <= zb[ph, kh]
            push = ~pop
            pp, kn = pend[push], kk[push] + 1
            v[pp, kn] = q
            zb[pp, kn] = s[push]
            k[pp] = kn
            k[pend[pop]] -= 1
            pend, fq = pend[pop], fq[pop]

    # query: the owner of p is the number of interval boundaries zb[j] (j >= 1) below p;
    # for integer p, zb < p  <=>  floor(clip(zb, -1, n)) < p.
    cnt = k + 1
    j = np.arange(n)
    valid = (j[None, :] >= 1) & (j[None, :] < cnt[:, None])
    c = np.floor(np.clip(zb, -1, n)).astype(np.int64)
    rows = np.broadcast_to(np.arange(m)[:, None], (m, n))
    hist = np.zeros((m, n + 2), dtype=np.int64)
    np.add.at(hist, (rows[valid], c[valid] + 1), 1)
    owner = np.cumsum(hist, axis=1)[:, :n]
    a = np.take_along_axis(v, owner, axis=1)
    d = (j[None, :] - a).astype(np.float64)
    val[lines] = np.take_along_axis(fl, a, axis=1) - w * (d * d)
    arg[lines] = a
    return val, arg


def _dp_reference(score: np.ndarray, wx: float, wy: float):
    nz, nx, ny = score.shape
    bp = np.zeros((nz, nx, ny), dtype=np.int32)
    best, best_pos = -np.inf, (0, 0, 0)
    prev = None
    yy = np.arange(ny)[None, :]
    for z in range(nz):
        s = score[z].astype(np.float64)
        if prev is None or not (prev > 0).any():
            cur = s
        else:
            g, ay = _envelope_lines(prev, wy)                 # along y, rows are x
            dt, axt = _envelope_lines(np.ascontiguousarray(g.T), wx)   # along x, rows are y
            dv, ax = dt.T, axt.T
            cont = dv > 0
            cur = np.where(cont, s + dv, s)
            axc = np.where(cont, ax, 0)
            bp[z] = np.where(cont, 1 + axc * ny + ay[axc, np.broadcast_to(yy, (nx, ny))], 0)
        a = int(np.argmax(cur))
        m = cur.flat[a]
        if m > 0 and m > best:
            best, best_pos = m, (z, a // ny, a % ny)
        prev = cur
    regions = np.tile(np.array([0, nx - 1, 0, ny - 1], dtype=np.int64), (nz, 1))
    return (best, *best_pos, regions, list(bp))
