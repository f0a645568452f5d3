# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""OptiC kernel: exact dynamic programming over axial slices.

Running value  V[z](p) = score[z](p) + max(0, D[z](p)),  with
D[z](p) = max_q V[z-1](q) - wx (px-qx)^2 - wy (py-qy)^2,
so a path may start fresh on any slice.  D is a 2D generalised distance transform
(Felzenszwalb & Huttenlocher): one upper-envelope pass along y, one along x.

Layout: slices are [x][y] with y contiguous.  Pass 1 runs along contiguous rows of V[z-1] and
stores its result transposed ([y][x]) a cache line at a time (blocks of BLK rows), so pass 2
also runs along contiguous memory; V[z] is written back block-wise the same way.

Exact pruning: only sources with V > 0 can make D > 0, so each envelope is built from the
positive sources only, and a line is evaluated only where its envelope can be positive (each
member within sqrt(f / w) + 2 pixels of its source, on its own segment).  Every other pixel
starts fresh (V = score) and is never copied; backpointers are stored on a box around the
evaluated pixels only.  With a score that is negative away from the cord this is a small part
of each slice; with a score positive everywhere the work is that of the full transform.

cordseg.optic.optimal_path_reference computes the same recurrence over whole slices with the
same float64 operations and the same tie rule, so both return identical paths.  Tie rule: at
equal values the smaller source index wins (smaller y in the first pass, then smaller x in the
second); a path continues only when D > 0 strictly; the path ends at the first maximum of V in
(z, x, y) order.
"""
import numpy as np

from libc.math cimport INFINITY, sqrt

# Identical paths with the NumPy reference need the same float64 rounding: no fused
# multiply-add contraction (the default where FMA exists, e.g. aarch64 or -march=native).
cdef extern from *:
    """
    #if defined(__clang__)
    #pragma STDC FP_CONTRACT OFF
    #elif defined(__GNUC__)
    #pragma GCC optimize ("fp-contract=off")
    #endif
    """

cdef enum:
    BLK = 8   # lines per block: a transposed write moves 8 doubles, one cache line


cdef inline int _push(const double* f, int q, double fq, double w, int* v, double* zb,
                      int k) noexcept nogil:
    """Add the parabola of source q (fq > 0) to the envelope whose top is k; returns the new
    top.  v[j] owns the points p with zb[j] < p <= zb[j+1] (zb[0] = -inf), so at a tie the
    smaller source wins.  With w == 0 only the first maximum is kept."""
    cdef int vk
    cdef double s
    if w == 0.0:
        if k < 0 or fq > f[v[0]]:
            v[0] = q
            zb[0] = -INFINITY
        return 0
    s = -INFINITY
    while k >= 0:
        vk = v[k]
        # q beats v[k] for p > s; pop v[k] when that leaves it no point of its own.
        # A true division (not a reciprocal table) keeps exact ties exact.
        s = ((f[vk] - fq) / (w * <double>(q - vk)) + <double>(q + vk)) * 0.5
        if s <= zb[k]:
            k -= 1
            s = -INFINITY
        else:
            break
    k += 1
    v[k] = q
    zb[k] = s
    return k


cdef inline int _envelope(double* f, const float* s, int x, const int* cl, const int* ch,
                          int lo, int hi, double w, int* v, double* zb) noexcept nogil:
    """Upper envelope of the parabolas f[q] - w (p - q)^2 over q in [lo, hi) with f[q] > 0;
    returns the number of members.  Line x of the previous slice: f holds the running value
    where it was evaluated (cl[q] <= x <= ch[q]), elsewhere it is the score s[q], which is
    copied into f for the members (later read from f)."""
    cdef int k = -1, q
    cdef double fq
    for q in range(lo, hi):
        if cl[q] <= x <= ch[q]:
            fq = f[q]
        else:
            fq = s[q]
        if fq > 0.0:
            f[q] = fq
            k = _push(f, q, fq, w, v, zb, k)
    return k + 1


cdef inline int _envelope_blocks(const double* f, int lo, int hi, const int* blist, int nbl,
                                 const int* bl, const int* bh, int y, double w, int* v,
                                 double* zb) noexcept nogil:
    """As _envelope, over the BLK-wide blocks of [lo, hi) listed in blist (block i starts at
    lo + i * BLK) whose first-pass range [bl, bh] holds y: only there is f valid, elsewhere it
    is <= 0."""
    cdef int k = -1, q, q0, i, blk
    cdef double fq
    for i in range(nbl):
        blk = blist[i]
        if bl[blk] <= y <= bh[blk]:
            q0 = lo + blk * BLK
            if q0 + BLK <= hi:
                for q in range(q0, q0 + BLK):      # fixed trip count: unrolled
                    fq = f[q]
                    if fq > 0.0:
                        k = _push(f, q, fq, w, v, zb, k)
            else:
                for q in range(q0, hi):
                    fq = f[q]
                    if fq > 0.0:
                        k = _push(f, q, fq, w, v, zb, k)
    return k + 1


cdef inline int _seg_start(double zb, int plo, int phi) noexcept nogil:
    """First integer p in [plo, phi] with zb < p (for integer p: zb < p <=> floor(zb) < p)."""
    if zb < <double>plo:
        return plo
    if zb >= <double>phi:
        return phi
    return <int>zb + 1          # zb >= plo >= 0 here, so truncation is floor


cdef inline void _fill(const double* f, int cnt, const int* v, const double* zb, double w,
                       int plo, int phi, double* out, int* arg) noexcept nogil:
    """First pass: out[p] = f[v] - w (p - v)^2 and arg[p] = v on p in [plo, phi), one owner's
    segment at a time (no per-pixel search)."""
    cdef int j, p, a, e, vj
    cdef double fv, d
    if cnt == 0:
        for p in range(plo, phi):
            out[p] = -INFINITY
            arg[p] = 0
        return
    a = plo
    for j in range(cnt):
        e = phi if j == cnt - 1 else _seg_start(zb[j + 1], plo, phi)
        vj = v[j]
        fv = f[vj]
        for p in range(a, e):
            d = <double>(p - vj)
            out[p] = fv - w * (d * d)
            arg[p] = vj
        a = e


cdef inline void _fill_pos(const double* f, const int* aprev, int ny, int cnt, const int* v,
                           const double* zb, double w, int plo, int phi,
                           double* out, int* arg) noexcept nogil:
    """Second pass: the transition D (0 where not positive) and the backpointer
    1 + qx * ny + qy of its source (qy = aprev[qx * ny], the first-pass argmax)."""
    cdef int j, p, a, e, vj, bpv
    cdef double fv, d, dval
    if cnt == 0:
        for p in range(plo, phi):
            out[p] = 0.0
        return
    a = plo
    for j in range(cnt):
        e = phi if j == cnt - 1 else _seg_start(zb[j + 1], plo, phi)
        vj = v[j]
        fv = f[vj]
        bpv = 1 + vj * ny + aprev[<Py_ssize_t>vj * ny]
        for p in range(a, e):
            d = <double>(p - vj)
            dval = fv - w * (d * d)
            out[p] = dval if dval > 0.0 else 0.0
            arg[p] = bpv
        a = e


cdef inline int _radius(double fmax, double w, int n) noexcept nogil:
    """Distance beyond which a source of value <= fmax only gives negative values, plus a
    2-pixel margin so that rounding cannot make a skipped pixel positive."""
    cdef double t
    if w == 0.0:
        return n
    t = sqrt(fmax / w)
    if t >= <double>n:
        return n
    return <int>t + 2


cdef inline bint _reach(const double* f, int cnt, const int* v, const double* zb, double w,
                        int n, int* lo, int* hi) noexcept nogil:
    """Pixels [lo, hi] outside which the envelope is surely <= 0: member j can only be
    positive on its own segment (zb[j], zb[j+1]] within sqrt(f/w) + 2 of its source (2 pixels
    of margin against rounding).  False when the envelope is nowhere positive."""
    cdef int j
    cdef double r, a, b, s0, s1, left = 0.0, right = 0.0
    cdef bint found = False
    if cnt == 0:
        return False
    if w == 0.0:
        lo[0] = 0
        hi[0] = n - 1
        return True
    for j in range(cnt):
        r = sqrt(f[v[j]] / w) + 2.0
        a = v[j] - r
        b = v[j] + r
        s0 = zb[j]
        s1 = zb[j + 1] if j + 1 < cnt else INFINITY
        if b > s0 and a <= s1:
            left = a if a > s0 else s0
            found = True
            break
    if not found:
        return False
    for j in range(cnt - 1, -1, -1):
        r = sqrt(f[v[j]] / w) + 2.0
        a = v[j] - r
        b = v[j] + r
        s0 = zb[j]
        s1 = zb[j + 1] if j + 1 < cnt else INFINITY
        if b > s0 and a <= s1:
            right = b if b < s1 else s1
            break
    if left >= <double>n or right < 0.0:          # (also keeps the int casts in range)
        return False
    lo[0] = 0 if left < 0.0 else <int>left
    hi[0] = n - 1 if right >= <double>(n - 1) else <int>right + 1
    return lo[0] <= hi[0]


cdef struct Scan:
    # positive support of the slice being finished, per row x its y range [rl[x], rh[x]],
    # and its first maximum in (x, y) order
    int* rl
    int* rh
    int bx, by
    double vmax


cdef inline void _note(Scan* st, double val, int x, int y) noexcept nogil:
    """Record a positive running value."""
    if y < st.rl[x]:
        st.rl[x] = y
    if y > st.rh[x]:
        st.rh[x] = y
    if val >= st.vmax:
        if val > st.vmax or x < st.bx or (x == st.bx and y < st.by):
            st.vmax = val
            st.bx = x
            st.by = y


def optic_dp(const float[:, :, ::1] score, double wx, double wy):
    """Run the DP over score (nz, nx, ny).

    Returns (best, z, x, y, regions, bps): the best running value and its first position;
    regions (nz, 4) int64 rows [x0, x1, y0, y1] (inclusive) of the box where slice z may
    continue a path, and bps[z] the int32 backpointers on that box (0 = the path starts here,
    else 1 + qx * ny + qy on slice z - 1), None where no pixel of slice z can continue."""
    cdef Py_ssize_t nz = score.shape[0]
    cdef int nx = <int>score.shape[1]
    cdef int ny = <int>score.shape[2]
    cdef Py_ssize_t nxy = <Py_ssize_t>nx * ny
    cdef int nmax = nx if nx > ny else ny
    cdef int nblk = nx // BLK + 1

    regions_arr = np.zeros((nz, 4), dtype=np.int64)
    regions_arr[:, 1] = -1
    regions_arr[:, 3] = -1
    cdef long long[:, ::1] regions = regions_arr
    bps = [None] * nz
    cdef int[:, ::1] bp_mv

    prev_arr = np.empty(nxy, dtype=np.float64)     # V[z-1] on its evaluated ranges (see _envelope)
    cur_arr = np.empty(nxy, dtype=np.float64)      # V[z] on the rows' evaluated x ranges
    gt_arr = np.empty(nxy, dtype=np.float64)       # first-pass values, stored [y][x]
    ay_arr = np.empty(nxy, dtype=np.int32)         # first-pass argmax y, stored [x][y]
    v_arr = np.empty(BLK * (nmax + 1), dtype=np.int32)       # one envelope per line of a block
    zb_arr = np.empty(BLK * (nmax + 2), dtype=np.float64)
    bufv_arr = np.empty(BLK * nmax, dtype=np.float64)         # a block's lines, untransposed
    bufa_arr = np.empty(BLK * nmax, dtype=np.int32)
    ints_arr = np.empty(4 * ny + 4 * nx + 3 * nblk + BLK, dtype=np.int32)
    cdef double[::1] prev_mv = prev_arr, cur_mv = cur_arr, gt_mv = gt_arr
    cdef double[::1] zb_mv = zb_arr, bufv_mv = bufv_arr
    cdef int[::1] ay_mv = ay_arr, v_mv = v_arr, bufa_mv = bufa_arr, ints_mv = ints_arr

    cdef double* prev = &prev_mv[0]
    cdef double* cur = &cur_mv[0]
    cdef double* tmp
    cdef double* gt = &gt_mv[0]
    cdef int* ay = &ay_mv[0]
    cdef int* v = &v_mv[0]
    cdef double* zb = &zb_mv[0]
    cdef double* bufv = &bufv_mv[0]
    cdef int* bufa = &bufa_mv[0]
    # per row y: the x range [cxl, cxh] where cur holds V[z] (elsewhere V[z] = score[z]);
    # pxl, pxh: the same for V[z-1] in prev
    cdef int* cxl = &ints_mv[0]
    cdef int* cxh = cxl + ny
    cdef int* pxl = cxh + ny
    cdef int* pxh = pxl + ny
    # per row x: the y range of positive V[z] (crl, crh) and V[z-1] (prl, prh)
    cdef int* crl = pxh + ny
    cdef int* crh = crl + nx
    cdef int* prl = crh + nx
    cdef int* prh = prl + nx
    # per first-pass block of BLK rows: the y range [gl, gh] it was evaluated on; the blocks
    # reaching a block of second-pass rows; per line of a block: its envelope size
    cdef int* gl = prh + nx
    cdef int* gh = gl + nblk
    cdef int* blist = gh + nblk
    cdef int* bcnt = blist + nblk
    cdef int* itmp
    cdef int* ba
    cdef int* bpz = NULL
    cdef const float* sc
    cdef const float* psc
    cdef const float* srow
    cdef double* row

    cdef Py_ssize_t z, idx
    cdef int x, y, p, x0, y0, b, nb, blk, nblk_used, nbl, i, ul, uh, lo, hi, npos, bf, bl, bm
    cdef double pm
    cdef int nbad = 0
    cdef int xs0 = 0, xs1 = -1                      # rows x holding positive V[z-1]
    cdef int xo0 = 0, xo1 = -1, yo0 = 0, yo1 = -1   # box where D[z] may be positive
    cdef int bw = 0, rx
    cdef bint have_prev = False, have_box
    cdef Scan st
    cdef double fmax = 0.0, val, dval
    cdef double best = -INFINITY
    cdef Py_ssize_t best_z = 0
    cdef int best_x = 0, best_y = 0

    with nogil:
        for y in range(ny):
            cxl[y] = 1
            cxh[y] = 0
        for x in range(nx):
            crl[x] = ny
            crh[x] = -1
        for z in range(nz):
            sc = &score[z, 0, 0]
            itmp = pxl
            pxl = cxl
            cxl = itmp
            itmp = pxh
            pxh = cxh
            cxh = itmp
            itmp = prl
            prl = crl
            crl = itmp
            itmp = prh
            prh = crh
            crh = itmp
            for y in range(ny):
                cxl[y] = 1
                cxh[y] = 0
            for x in range(nx):
                crl[x] = ny
                crh[x] = -1
            st.rl = crl
            st.rh = crh
            st.bx = st.by = 0
            st.vmax = 0.0
            have_box = False
            if have_prev:
                psc = &score[z - 1, 0, 0]
                # Pass 1, along y over contiguous rows of V[z-1], BLK rows at a time: each
                # block is evaluated on the union [gl, gh] of its rows' reach, and stored
                # transposed one cache line at a time.
                yo0 = ny
                yo1 = -1
                x0 = xs0
                blk = 0
                while x0 <= xs1:
                    nb = xs1 + 1 - x0 if xs1 + 1 - x0 < BLK else BLK
                    ul = ny
                    uh = -1
                    for b in range(nb):
                        row = prev + <Py_ssize_t>(x0 + b) * ny
                        bcnt[b] = _envelope(row, psc + <Py_ssize_t>(x0 + b) * ny, x0 + b, pxl,
                                            pxh, prl[x0 + b], prh[x0 + b] + 1, wy,
                                            v + b * (nmax + 1), zb + b * (nmax + 2))
                        if _reach(row, bcnt[b], v + b * (nmax + 1), zb + b * (nmax + 2), wy,
                                  ny, &lo, &hi):
                            if lo < ul:
                                ul = lo
                            if hi > uh:
                                uh = hi
                    gl[blk] = ul
                    gh[blk] = uh
                    if ul <= uh:
                        for b in range(nb):
                            row = prev + <Py_ssize_t>(x0 + b) * ny
                            _fill(row, bcnt[b], v + b * (nmax + 1), zb + b * (nmax + 2), wy,
                                  ul, uh + 1, bufv + b * nmax, ay + <Py_ssize_t>(x0 + b) * ny)
                        for p in range(ul, uh + 1):
                            idx = <Py_ssize_t>p * nx + x0
                            for b in range(nb):
                                gt[idx + b] = bufv[b * nmax + p]
                        if ul < yo0:
                            yo0 = ul
                        if uh > yo1:
                            yo1 = uh
                    x0 += BLK
                    blk += 1
                nblk_used = blk
                have_box = yo0 <= yo1

            if have_box:
                rx = _radius(fmax, wx, nx)
                xo0 = xs0 - rx if xs0 - rx > 0 else 0
                xo1 = xs1 + rx if xs1 + rx < nx - 1 else nx - 1
                bw = yo1 - yo0 + 1
                with gil:
                    regions[z, 0] = xo0
                    regions[z, 1] = xo1
                    regions[z, 2] = yo0
                    regions[z, 3] = yo1
                    bps[z] = np.zeros((xo1 - xo0 + 1, bw), dtype=np.int32)   # 0: starts here
                    bp_mv = bps[z]
                    bpz = &bp_mv[0, 0]

                # Pass 2, along x over contiguous rows of the transposed first pass (sources
                # only from the first-pass blocks that reached the row), same blocking; then
                # V[z], the backpointers and the positive support on the evaluated ranges.
                y0 = yo0
                while y0 <= yo1:
                    nb = yo1 + 1 - y0 if yo1 + 1 - y0 < BLK else BLK
                    nbl = 0
                    for i in range(nblk_used):
                        if gl[i] <= y0 + nb - 1 and gh[i] >= y0:
                            blist[nbl] = i
                            nbl += 1
                    ul = nx
                    uh = -1
                    for b in range(nb):
                        row = gt + <Py_ssize_t>(y0 + b) * nx
                        bcnt[b] = _envelope_blocks(row, xs0, xs1 + 1, blist, nbl, gl, gh,
                                                   y0 + b, wx, v + b * (nmax + 1),
                                                   zb + b * (nmax + 2))
                        if _reach(row, bcnt[b], v + b * (nmax + 1), zb + b * (nmax + 2), wx,
                                  nx, &lo, &hi):
                            if lo < ul:
                                ul = lo
                            if hi > uh:
                                uh = hi
                    ul = ul if ul > xo0 else xo0
                    uh = uh if uh < xo1 else xo1
                    if ul <= uh:
                        for b in range(nb):
                            row = gt + <Py_ssize_t>(y0 + b) * nx
                            _fill_pos(row, ay + y0 + b, ny, bcnt[b], v + b * (nmax + 1),
                                      zb + b * (nmax + 2), wx, ul, uh + 1,
                                      bufv + b * nmax, bufa + b * nmax)
                            cxl[y0 + b] = ul
                            cxh[y0 + b] = uh
                        for p in range(ul, uh + 1):
                            idx = <Py_ssize_t>p * ny + y0
                            ba = bpz + <Py_ssize_t>(p - xo0) * bw + (y0 - yo0)
                            bf = -1                  # first / last positive b, first max
                            bl = -1
                            bm = -1
                            pm = 0.0
                            for b in range(nb):
                                dval = bufv[b * nmax + p]
                                if dval > 0.0:
                                    val = <double>sc[idx + b] + dval
                                    ba[b] = bufa[b * nmax + p]
                                else:
                                    val = sc[idx + b]
                                cur[idx + b] = val
                                if val > 0.0:
                                    if bf < 0:
                                        bf = b
                                    bl = b
                                    if val > pm:
                                        pm = val
                                        bm = b
                            if bf >= 0:
                                _note(&st, pm, p, y0 + bm)
                                if y0 + bf < crl[p]:
                                    crl[p] = y0 + bf
                                if y0 + bl > crh[p]:
                                    crh[p] = y0 + bl
                    y0 += BLK

            # every other pixel starts fresh: V = score, scanned but never copied.  The
            # same branch-free sweep checks that the slice is finite: score[z] has only been
            # added to D so far, and the envelopes of slice z + 1 must never see NaN / Inf.
            for x in range(nx):
                srow = sc + <Py_ssize_t>x * ny
                npos = 0
                for y in range(ny):
                    npos += srow[y] > <float>0.0
                    nbad += not (srow[y] - srow[y] == <float>0.0)
                if npos:
                    for y in range(ny):
                        if srow[y] > <float>0.0 and not (cxl[y] <= x <= cxh[y]):
                            _note(&st, srow[y], x, y)
            if nbad:
                break

            xs0 = 0
            while xs0 < nx and crl[xs0] > crh[xs0]:
                xs0 += 1
            xs1 = nx - 1
            while xs1 >= 0 and crl[xs1] > crh[xs1]:
                xs1 -= 1
            have_prev = xs0 <= xs1
            if have_prev:
                fmax = st.vmax
                if st.vmax > best:
                    best = st.vmax
                    best_z = z
                    best_x = st.bx
                    best_y = st.by
            tmp = prev
            prev = cur
            cur = tmp
    if nbad:
        raise ValueError("score contains NaN or Inf")
    return best, best_z, best_x, best_y, regions_arr, bps
