"""The tile lists of :func:`preprocess.ranges.range_tiles` in scalar loops (numba).

One pass over the (query tile, sequence) segments finds each segment's key-tile intervals in
closed form (at most two active ranges, sinks and window, and two full ranges inside them); a
second counts each list from the intervals, a third writes the tiles they name into one
buffer, and counting sorts by key tile write the transposes. O(segments + tiles) scalar work:
about 50 us at L = 32768 on a 2-core VM, where whole-array numpy calls took 200-300.

Imported on the first analytic layout (numba takes about a second to import); numba compiles
these functions once per machine and caches them next to this file.
"""

import numpy as np
from numba import njit


@njit(cache=True)
def _segments(cu_q, cu_k, left, right, sinks, causal, bm, bn, n_qt):
    """Per segment: its query tile and eight interval bounds ``[a0, a1, b0, b1, f0, f1, g0,
    g1]``: active ranges ``[a0, a1]``, ``[b0, b1]`` and full ranges ``[f0, f1]``, ``[g0, g1]``
    (sorted, disjoint; empty where end < start). Returns ``(seg_qt, bounds)``."""
    n_seq = cu_q.size - 1
    q_len = cu_q[n_seq]
    per_qt = np.zeros(n_qt, np.int64)
    n_seg = 0
    for s in range(n_seq):
        if cu_q[s + 1] > cu_q[s]:
            t0, t1 = cu_q[s] // bm, (cu_q[s + 1] - 1) // bm
            per_qt[t0:t1 + 1] += 1
            n_seg += t1 - t0 + 1
    seg_qt = np.empty(n_seg, np.int64)
    bounds = np.empty((n_seg, 8), np.int64)
    first_w = max(-right, 0) if causal else -right  # the first position with a window
    i = 0
    for s in range(n_seq):
        q0, k0 = cu_q[s], cu_k[s]
        nq, nk = cu_q[s + 1] - q0, cu_k[s + 1] - k0
        if nq == 0:
            continue
        shift = nk - nq - q0  # row -> position
        for qt in range(q0 // bm, (q0 + nq - 1) // bm + 1):
            pa = max(q0, qt * bm) + shift
            pb = min(q0 + nq, qt * bm + bm) - 1 + shift
            top_a = min(nk - 1, pa) if causal else nk - 1
            top_b = min(nk - 1, pb) if causal else nk - 1
            # the union of the rows' windows is one range: lo(p + 1) <= hi(p) + 1
            p_w = max(pa, first_w)
            has_w = p_w <= pb and nk > 0
            tw0, tw1 = 0, -1
            if has_w:
                tw0 = (k0 + max(p_w - left, 0)) // bn
                tw1 = (k0 + min(pb + right, top_b)) // bn
            a0, a1, b0, b1 = tw0, tw1, 0, -1
            if sinks > 0:
                s_hi = min(sinks - 1, top_b)
                if s_hi >= 0:
                    ts1 = (k0 + s_hi) // bn
                    if has_w and tw0 > ts1 + 1:  # sinks and window apart
                        a0, a1, b0, b1 = k0 // bn, ts1, tw0, tw1
                    else:
                        a0, a1 = k0 // bn, max(ts1, tw1) if has_w else ts1
            # full tiles: one segment in the query tile, no inactive pair above the first
            # row's reach (it only grows) nor in the last row's gap [sinks, pb - left - 1]
            hi_a = min(pa + right, top_a) if pa >= first_w and nk > 0 else -1
            cap = max(min(sinks - 1, top_a), hi_a)
            lo_f = -(-k0 // bn)
            hi_f = (k0 + cap + 1) // bn - 1
            if per_qt[qt] > 1 or (qt == n_qt - 1 and q_len % bm):
                hi_f = -1
            gap_end = pb - left
            above = -(-(k0 + gap_end) // bn)  # the first key tile after the gap
            f0, f1, g0, g1 = max(lo_f, above), hi_f, 0, -1
            if sinks > 0:
                below = (k0 + sinks) // bn - 1  # the last key tile before the gap
                if gap_end <= sinks or above <= below + 1:  # no key tile inside the gap
                    f0 = lo_f
                else:
                    f0, f1, g0, g1 = lo_f, min(hi_f, below), max(lo_f, above), hi_f
            b = bounds[i]
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7] = a0, a1, b0, b1, f0, f1, g0, g1
            seg_qt[i] = qt
            i += 1
    return seg_qt, bounds


@njit(cache=True, inline="always")
def _partial_tiles(b, qt, last, col, qts, n, write):
    """The partial tiles of one segment (bounds ``b``): its active ranges minus its full ones,
    in key order, none at or below ``last`` (the query tile's last partial tile so far: a key
    tile shared with the previous sequence is listed once). Counts them, or with ``write``
    also stores them at ``col[n:]`` / ``qts[n:]``. Returns ``(last, n)``."""
    # the non-empty full ranges, in key order: [u0, u1], then [w0, w1]
    n_full = 0
    u0, u1, w0, w1 = b[4], b[5], b[6], b[7]
    if b[5] >= b[4]:
        n_full = 1
    if b[7] >= b[6]:
        if n_full == 0:
            u0, u1 = b[6], b[7]
        n_full += 1
    for lo, hi in ((b[0], b[1]), (b[2], b[3])):
        cur = lo
        for cut in range(n_full + 1):  # the pieces before, between and after them
            x0, x1 = (u0, u1) if cut == 0 else (w0, w1)
            e = min(hi, x0 - 1) if cut < n_full else hi
            s = max(cur, last + 1)
            if e >= s:
                if write:
                    for kt in range(s, e + 1):
                        col[n] = kt
                        qts[n] = qt
                        n += 1
                else:
                    n += e - s + 1
                last = e
            if cut < n_full:
                cur = max(cur, x1 + 1)
    return last, n


@njit(cache=True)
def _walk(seg_qt, bounds, full_ptr, part_ptr, f_col, p_col, p_qt, write):
    """Every segment's tiles in order: counts them per query tile (``full_ptr``, ``part_ptr``
    at ``qt + 1``), or with ``write`` stores the full tiles' key tiles in ``f_col`` and the
    partial tiles' in ``p_col`` / ``p_qt``. Returns the numbers of full and partial tiles."""
    n_f = n_p = 0
    last = -1  # the last partial key tile of the current query tile
    for i in range(seg_qt.size):
        qt = seg_qt[i]
        if i == 0 or seg_qt[i - 1] != qt:
            last = -1
        b = bounds[i]
        for lo, hi in ((b[4], b[5]), (b[6], b[7])):
            if write:
                for kt in range(lo, hi + 1):
                    f_col[n_f] = kt
                    n_f += 1
            else:
                n_f += max(hi - lo + 1, 0)
        last, n_p = _partial_tiles(b, qt, last, p_col, p_qt, n_p, write)
        if not write:
            full_ptr[qt + 1] = n_f
            part_ptr[qt + 1] = n_p
    return n_f, n_p


@njit(cache=True)
def _transpose(ptr_out, rows_out, idx_out, cols, rows, n_kt):
    """Counting sort of the tiles ``(rows, cols)`` by key tile, stable (query tiles stay
    ascending): ``ptr_out [n_kt + 1]``, ``rows_out`` and ``idx_out`` (forward index)."""
    ptr_out[:] = 0
    for t in range(cols.size):
        ptr_out[cols[t] + 1] += 1
    for kt in range(n_kt):
        ptr_out[kt + 1] += ptr_out[kt]
    fill = ptr_out[:n_kt].copy()
    for t in range(cols.size):
        j = fill[cols[t]]
        fill[cols[t]] += 1
        rows_out[j] = rows[t]
        idx_out[j] = t


HEADER = 16  # int32 scalars before the lists: what the bit kernel reads besides them


@njit(cache=True)
def _bit_length(n):
    b = 0
    while n:
        n >>= 1
        b += 1
    return b


@njit(cache=True)
def range_lists(cu_q, cu_k, left, right, sinks, causal, bm, bn, n_qt, n_kt):
    """Both CSRs, their transposes, each partial tile's query tile, then ``cu_q`` and
    ``cu_k``, as int32 slices of one buffer, each 16-byte aligned (a tensor of its own would
    be), after a header of ``HEADER`` ints: ``q_len, n_seq, n_seq.bit_length(), left, right,
    sinks`` and where ``part_qt``, ``part_col``, ``cu_q`` and ``cu_k`` start (what
    ``preprocess.triton.ranges`` reads). Returns ``(buffer, starts, sizes)``. Offsets are
    int64, the window normalized (``ranges.normalized_window``). Tiles of a query tile are in
    key order; partial tiles of neighbouring sequences that share a key tile are listed once."""
    seg_qt, bounds = _segments(cu_q, cu_k, left, right, sinks, causal, bm, bn, n_qt)
    # counts first (O(segments)), so every list is written once, in place
    full_ptr = np.zeros(n_qt + 1, np.int64)
    part_ptr = np.zeros(n_qt + 1, np.int64)
    none = np.empty(0, np.int32)  # the write pass's arrays, unused: one compiled signature
    n_f, n_p = _walk(seg_qt, bounds, full_ptr, part_ptr, none, none, none, False)
    # every entry of the buffer is addressed by an int32 offset (the header's, the kernels');
    # refused before anything that large is allocated
    if 2 * n_f + 4 * n_p + 2 * (n_qt + n_kt) + cu_q.size + cu_k.size + 64 >= 2**31:
        raise ValueError("layout has too many tiles for int32 offsets (2**31 list entries); "
                         "use larger block_m / block_n")
    sizes = np.array([n_qt + 1, n_f, n_qt + 1, n_p, n_kt + 1, n_f, n_kt + 1, n_p, n_p, n_p,
                      cu_q.size, cu_k.size], np.int64)
    starts = np.empty(sizes.size, np.int64)
    starts[0] = HEADER
    for j in range(1, sizes.size):
        starts[j] = starts[j - 1] + (sizes[j - 1] + 3) // 4 * 4
    out = np.zeros(starts[-1] + sizes[-1], np.int32)
    n_seq = cu_q.size - 1
    out[0], out[1], out[2] = cu_q[n_seq], n_seq, _bit_length(n_seq)
    out[3], out[4], out[5] = left, right, sinks
    out[6], out[7], out[8], out[9] = starts[9], starts[3], starts[10], starts[11]
    # every query tile has a segment (cu_q starts at 0 and ends at q_len)
    out[starts[0]:starts[0] + sizes[0]] = full_ptr
    out[starts[2]:starts[2] + sizes[2]] = part_ptr
    f_col = out[starts[1]:starts[1] + n_f]
    p_col = out[starts[3]:starts[3] + n_p]
    p_qt = out[starts[9]:starts[9] + n_p]
    _walk(seg_qt, bounds, full_ptr, part_ptr, f_col, p_col, p_qt, True)
    out[starts[10]:starts[10] + cu_q.size] = cu_q
    out[starts[11]:starts[11] + cu_k.size] = cu_k
    f_qt = np.empty(n_f, np.int32)  # each full tile's query tile, what the transpose lists
    for qt in range(n_qt):
        f_qt[full_ptr[qt]:full_ptr[qt + 1]] = qt
    _transpose(out[starts[4]:starts[4] + n_kt + 1], out[starts[5]:starts[5] + n_f],
               np.empty(n_f, np.int32), f_col, f_qt, n_kt)
    _transpose(out[starts[6]:starts[6] + n_kt + 1], out[starts[7]:starts[7] + n_p],
               out[starts[8]:starts[8] + n_p], p_col, p_qt, n_kt)
    return out, starts, sizes
