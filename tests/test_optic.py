"""OptiC: the Cython kernel against the NumPy reference, against brute force, on curves with
noise and gaps, slice selection, tie rules and input validation."""
import itertools
import zlib

import numpy as np
import pytest

from cordseg.optic import OpticPath, optimal_path, optimal_path_reference


def objective(score, spacing, lam, path):
    """The objective of a path, recomputed independently in float64."""
    sx, sy, sz = spacing
    zs = np.arange(path.z_start, path.z_stop + 1)
    s = np.asarray(score, dtype=np.float32).astype(np.float64)
    total = s[zs, path.x, path.y].sum()
    dx, dy = np.diff(path.x), np.diff(path.y)
    return total - lam * ((dx**2 * sx**2 + dy**2 * sy**2) / sz).sum()


def assert_same(a, b):
    assert (a is None) == (b is None), (a, b)
    if a is None:
        return
    assert (a.z_start, a.z_stop) == (b.z_start, b.z_stop)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.total == pytest.approx(b.total, rel=1e-6)


def both(score, spacing, lam):
    a = optimal_path(score, spacing, lam)
    b = optimal_path_reference(score, spacing, lam)
    assert_same(a, b)
    if a is not None:
        assert len(a.x) == len(a.y) == a.z_stop - a.z_start + 1 == len(a)
        assert a.total > 0
        assert objective(score, spacing, lam, a) == pytest.approx(a.total, rel=1e-9, abs=1e-9)
    return a


def curve_score(shape=(60, 64, 64), gaps=(), cord=(5, 55), noise=0.1, seed=0, width=2.0):
    """A smooth known curve of positive score in a negative, noisy background."""
    nz, nx, ny = shape
    rng = np.random.default_rng(seed)
    z = np.arange(nz)
    cx = nx / 2 + 0.15 * nx * np.sin(z / 10.0)
    cy = ny / 2 + 0.1 * ny * np.cos(z / 13.0)
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    score = np.empty(shape, dtype=np.float32)
    for k in range(nz):
        heat = np.exp(-((xx - cx[k]) ** 2 + (yy - cy[k]) ** 2) / (2 * width**2))
        if not cord[0] <= k < cord[1] or k in gaps:
            heat = 0.0
        score[k] = heat - 0.3 + rng.normal(0.0, noise, (nx, ny))
    return score, cx, cy


# ------------------------------------------------------------------ Cython == reference
@pytest.mark.parametrize(
    "shape, spacing, lam",
    [
        ((1, 7, 9), (1.0, 1.0, 1.0), 1.0),
        ((5, 1, 8), (0.5, 0.5, 2.0), 0.5),
        ((5, 8, 1), (0.5, 0.5, 2.0), 0.5),
        ((1, 1, 1), (1.0, 1.0, 1.0), 1.0),
        ((6, 11, 13), (0.3, 1.7, 4.0), 0.7),       # anisotropic
        ((7, 10, 12), (1.0, 1.0, 1.0), 0.0),        # no smoothness: per-slice maxima
        ((7, 10, 12), (1.0, 1.0, 1.0), 1e6),        # no move is ever worth it
        ((12, 33, 19), (0.5, 0.5, 1.0), 0.05),
        ((9, 17, 40), (2.0, 0.25, 1.0), 3.0),
    ],
)
@pytest.mark.parametrize("offset", [-1.5, -0.3, 0.5])
def test_cython_equals_reference_random(shape, spacing, lam, offset):
    rng = np.random.default_rng(zlib.crc32(repr((shape, lam, offset)).encode()))
    score = (rng.normal(size=shape) + offset).astype(np.float32)
    both(score, spacing, lam)


@pytest.mark.parametrize("lam", [5e-324, 1e-300, 1e300, 1e307])
def test_cython_equals_reference_extreme_lam(lam):
    rng = np.random.default_rng(12)
    for offset in (-1.0, 0.5, 3.0):
        score = (rng.normal(size=(6, 9, 11)) + offset).astype(np.float32)
        both(score, (1.0, 1.0, 1.0), lam)


def test_cython_equals_reference_many_small():
    rng = np.random.default_rng(7)
    for _ in range(150):
        shape = tuple(int(n) for n in rng.integers(1, 9, 3))
        score = (rng.normal(size=shape) + rng.uniform(-1.5, 1)).astype(np.float32)
        spacing = tuple(rng.uniform(0.2, 3.0, 3))
        lam = float(rng.choice([0.0, 1e-3, 0.1, 1.0, 10.0, 1e4]))
        both(score, spacing, lam)


def test_cython_equals_reference_when_pruning():
    """Sparse positives (a tube, specks, a far blob): the kernel evaluates slices only where
    the transition can be positive and stores backpointers there; results must not change."""
    from cordseg._optic import optic_dp

    score, _, _ = curve_score(shape=(30, 70, 80), noise=0.05, seed=3)
    rng = np.random.default_rng(3)
    for k in range(0, 30, 3):
        score[k, rng.integers(0, 70, 4), rng.integers(0, 80, 4)] = 0.8      # specks
    score[8:20, 60:66, 5:9] += 1.0                                          # far blob
    spacing = (0.5, 0.6, 1.5)
    for lam in (0.0, 0.05, 1.0):
        both(score, spacing, lam)
    # the pruned case really is pruned: backpointer boxes smaller than the slice
    sx, sy, sz = spacing
    _, _, _, _, regions, bps = optic_dp(score, 1.0 * sx * sx / sz, 1.0 * sy * sy / sz)
    areas = [b.size for b in bps if b is not None]
    assert len(areas) >= 25 and np.mean(areas) < 0.8 * 70 * 80 and min(areas) < 0.5 * 70 * 80


def test_cython_equals_reference_dense_smooth():
    """All-positive smooth score: no pruning at all."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(11)
    score = gaussian_filter(rng.normal(size=(8, 40, 30)), (0, 2, 2)) * 5 + 2
    both(score.astype(np.float32), (0.8, 0.8, 1.0), 0.3)


def test_use_reference_flag():
    score, _, _ = curve_score(shape=(10, 20, 20), seed=5)
    assert_same(optimal_path(score, (1, 1, 1), 0.5, use_reference=True),
                optimal_path(score, (1, 1, 1), 0.5))


# ------------------------------------------------------------------ optimality
def brute_force(score, spacing, lam):
    """Best objective over every contiguous slice range and every path (0 = empty path)."""
    nz, nx, ny = score.shape
    pts = [(x, y) for x in range(nx) for y in range(ny)]
    best = 0.0
    for a in range(nz):
        for b in range(a, nz):
            for path in itertools.product(pts, repeat=b - a + 1):
                xs = np.array([p[0] for p in path])
                ys = np.array([p[1] for p in path])
                p = OpticPath(a, b, xs, ys, 0.0)
                best = max(best, objective(score, spacing, lam, p))
    return best


@pytest.mark.parametrize("shape", [(3, 3, 3), (3, 2, 3), (2, 3, 3), (4, 2, 2)])
def test_optimal_against_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(4):
        score = (rng.normal(size=shape) + rng.uniform(-1.0, 0.5)).astype(np.float32)
        spacing = tuple(rng.uniform(0.5, 2.0, 3))
        lam = [0.0, 0.2, 1.0, 5.0][trial]
        best = brute_force(score, spacing, lam)
        for use_reference in (False, True):
            p = optimal_path(score, spacing, lam, use_reference=use_reference)
            got = 0.0 if p is None else p.total
            assert got == pytest.approx(best, rel=1e-9, abs=1e-9)
            if p is not None:
                assert objective(score, spacing, lam, p) == pytest.approx(best, rel=1e-9)


# ------------------------------------------------------------------ curves, gaps, extent
def voxel_error(path, cx, cy):
    """Per slice, the larger of the x and y distances to the true centre's voxel."""
    z = path.z
    return np.maximum(np.abs(path.x - np.round(cx[z])), np.abs(path.y - np.round(cy[z])))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovers_curve_and_bridges_gaps(seed):
    gaps = (20, 21, 22, 23, 40)                  # slices with no signal at all
    score, cx, cy = curve_score(gaps=gaps, noise=0.05, seed=seed)
    p = both(score, (0.5, 0.5, 1.0), 0.5)
    assert (p.z_start, p.z_stop) == (5, 54)      # one path through the gaps, cord extent only
    assert voxel_error(p, cx, cy).max() <= 1     # on signal slices and across the gaps
    assert np.abs(np.diff(p.x)).max() <= 2 and np.abs(np.diff(p.y)).max() <= 2


def test_leaves_out_slices_without_cord():
    score, cx, cy = curve_score(shape=(40, 48, 48), cord=(9, 31), noise=0.05, seed=2)
    p = both(score, (1.0, 1.0, 1.0), 0.1)
    assert (p.z_start, p.z_stop) == (9, 30)
    assert voxel_error(p, cx, cy).max() <= 1


def test_single_slice_and_single_pixel():
    score = np.full((1, 5, 6), -1.0, dtype=np.float32)
    score[0, 3, 2] = 2.5
    p = both(score, (1, 1, 1), 1.0)
    assert (p.z_start, p.z_stop, int(p.x[0]), int(p.y[0]), p.total) == (0, 0, 3, 2, 2.5)
    p = both(np.array([[[0.5]]] * 4, dtype=np.float32), (1, 1, 5), 1.0)
    assert (p.z_start, p.z_stop, p.total) == (0, 3, 2.0)


@pytest.mark.parametrize("fill", [-1.0, 0.0])
def test_none_without_positive_total(fill):
    score = np.full((6, 7, 8), fill, dtype=np.float32)
    assert optimal_path(score, (1, 1, 1), 1.0) is None
    assert optimal_path_reference(score, (1, 1, 1), 1.0) is None
    rng = np.random.default_rng(0)
    neg = -np.abs(rng.normal(size=(5, 9, 9))).astype(np.float32)
    assert optimal_path(neg, (1, 1, 1), 0.0) is None


# ------------------------------------------------------------------ tie rules
def test_ties_smallest_index_and_first_end():
    # one slice, equal maxima: the first in (x, y) order
    s = np.zeros((1, 3, 3), dtype=np.float32)
    s[0, 2, 0] = s[0, 1, 2] = s[0, 1, 1] = 1.0
    p = both(s, (1, 1, 1), 1.0)
    assert (int(p.x[0]), int(p.y[0])) == (1, 1)
    # equal predecessors at the same distance: the smaller y, then the smaller x
    s = np.full((2, 3, 3), -5.0, dtype=np.float32)
    s[0, 1, 0] = s[0, 1, 2] = 2.0
    s[1, 1, 1] = 3.0
    p = both(s, (1, 1, 1), 0.5)
    assert (p.z_start, list(p.x), list(p.y), p.total) == (0, [1, 1], [0, 1], 4.5)
    s = np.full((2, 3, 3), -5.0, dtype=np.float32)
    s[0, 0, 1] = s[0, 2, 1] = 2.0
    s[1, 1, 1] = 3.0
    p = both(s, (1, 1, 1), 0.5)
    assert (list(p.x), list(p.y)) == ([0, 1], [1, 1])
    # equal best totals on two slices: the earlier end
    s = np.full((3, 2, 2), -1.0, dtype=np.float32)
    s[0, 0, 0] = 2.0
    s[2, 1, 1] = 2.0
    p = both(s, (1, 1, 1), 1.0)
    assert (p.z_start, p.z_stop) == (0, 0)


def test_tie_between_continuing_and_starting_fresh():
    # continuing from slice 0 adds exactly 0 (1 - lam * 1): the path starts fresh
    s = np.full((2, 1, 2), -3.0, dtype=np.float32)
    s[0, 0, 0] = 1.0
    s[1, 0, 1] = 5.0
    p = both(s, (1, 1, 1), 1.0)
    assert (p.z_start, p.z_stop, p.total) == (1, 1, 5.0)
    p = both(s, (1, 1, 1), 0.75)                  # adds 0.25 > 0: continue
    assert (p.z_start, p.z_stop, p.total) == (0, 1, 5.25)


def test_lam_zero_takes_slice_maxima():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(6, 10, 11)).astype(np.float32) + 3.0
    p = both(s, (1, 1, 1), 0.0)
    assert (p.z_start, p.z_stop) == (0, 5)
    flat = s.reshape(6, -1).argmax(axis=1)
    np.testing.assert_array_equal(p.x, flat // 11)
    np.testing.assert_array_equal(p.y, flat % 11)


def test_spacing_weights_axes():
    # moving 2 voxels along x costs lam * 4 * sx^2 / sz: cheap with small sx, not with big sx
    s = np.full((2, 3, 1), -9.0, dtype=np.float32)
    s[0, 0, 0] = 1.0
    s[1, 2, 0] = 1.0
    assert len(both(s, (0.25, 5.0, 1.0), 1.0)) == 2      # cost 0.25 < 1
    assert len(both(s, (1.0, 0.1, 1.0), 1.0)) == 1       # cost 4 > 1
    assert len(both(s, (1.0, 0.1, 8.0), 1.0)) == 2       # thick slices: cost 0.5


# ------------------------------------------------------------------ input handling
def test_accepts_other_dtypes_and_layouts():
    rng = np.random.default_rng(9)
    s64 = rng.normal(size=(5, 6, 7))
    ref = optimal_path(s64.astype(np.float32), (1, 1, 1), 0.5)
    assert_same(optimal_path(s64, (1, 1, 1), 0.5), ref)
    s_f = np.asfortranarray(s64.astype(np.float32))
    assert_same(optimal_path(s_f, [1, 1, 1], np.float32(0.5)), ref)
    ints = (rng.integers(-3, 3, size=(4, 5, 5))).astype(np.int16)
    assert_same(optimal_path(ints, (1, 1, 1), 1), optimal_path_reference(ints, (1, 1, 1), 1))


@pytest.mark.parametrize("where", [(0, 0, 0), (3, 4, 5), (6, 9, 9)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float32_rejected(where, bad):
    """float32 input is checked inside the kernel's sweep: any slice, any value."""
    score, _, _ = curve_score(shape=(7, 10, 10), seed=6)
    score[where] = bad
    for fn in (optimal_path, optimal_path_reference):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(score, (1, 1, 1), 0.5)


@pytest.mark.parametrize(
    "score, spacing, lam, match",
    [
        (np.zeros((4, 4)), (1, 1, 1), 1.0, "3D"),
        (np.zeros((2, 4, 4, 1)), (1, 1, 1), 1.0, "3D"),
        (np.zeros((0, 4, 4)), (1, 1, 1), 1.0, "empty"),
        (np.zeros((3, 4, 0)), (1, 1, 1), 1.0, "empty"),
        (np.full((2, 3, 3), np.nan), (1, 1, 1), 1.0, "NaN"),
        (np.full((2, 3, 3), np.inf), (1, 1, 1), 1.0, "NaN or Inf"),
        (np.full((2, 3, 3), 1e300), (1, 1, 1), 1.0, "float32"),
        (np.zeros((2, 3, 3), dtype=complex), (1, 1, 1), 1.0, "real"),
        (np.array([[["a"]]]), (1, 1, 1), 1.0, "numeric"),
        (np.zeros((2, 3, 3), dtype=object), (1, 1, 1), 1.0, "numeric"),
        (np.zeros((2, 3, 3)), (1, 1), 1.0, "spacing"),
        (np.zeros((2, 3, 3)), (1, 0, 1), 1.0, "spacing"),
        (np.zeros((2, 3, 3)), (1, 1, -2), 1.0, "spacing"),
        (np.zeros((2, 3, 3)), (1, np.nan, 1), 1.0, "spacing"),
        (np.zeros((2, 3, 3)), 1.0, 1.0, "spacing"),
        (np.zeros((2, 3, 3)), ("a", 1, 1), 1.0, "spacing"),
        (np.zeros((2, 3, 3)), (1, 1, 1), -0.1, "lam"),
        (np.zeros((2, 3, 3)), (1, 1, 1), np.nan, "lam"),
        (np.zeros((2, 3, 3)), (1, 1, 1), np.inf, "lam"),
        (np.zeros((2, 3, 3)), (1, 1, 1), "1", "lam"),
        (np.zeros((2, 3, 3)), (1, 1, 1), None, "lam"),
        (np.zeros((2, 3, 3)), (1e200, 1, 1e-200), 1e100, "overflows"),
    ],
)
def test_invalid_input(score, spacing, lam, match):
    for fn in (optimal_path, optimal_path_reference):
        with pytest.raises(ValueError, match=match):
            fn(score, spacing, lam)
