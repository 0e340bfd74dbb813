"""Tile metadata of packed sequences whose query rows each see at most two contiguous key ranges
of their own sequence: a FlashAttention window (clipped by causality) and attention sinks.

Query ``a`` (local) of sequence ``s`` has position ``p = a + Lk_s - Lq_s`` (bottom-right
aligned) and sees local keys ``[0, min(sinks, T) - 1]`` and ``[max(p - left, 0), min(p + right,
T)]``, ``T = Lk_s - 1`` (``min(Lk_s - 1, p)`` when causal). Both bounds grow with ``p``, so the
key tiles a (query tile, sequence) *segment* visits, which of them are full and the number of
active pairs are closed-form in the segment's first and last rows: :func:`range_tiles` builds the
whole CSR and its transpose on the host (numpy, O(tiles + sequences), no loop over tiles or
sequences), so every size is known before anything reaches a device. Only the partial tiles'
bits are per row: :func:`range_masks_numpy` on the host, ``preprocess.triton.ranges`` on a GPU.
Both give exactly what ``mask_to_tiles`` gives for the same dense mask.
"""

from typing import NamedTuple

import numpy as np

# Totals at or above this keep the predicate engine: the device bits use int32 positions.
MAX_TOKENS = 2**30
_BIG = 2**40  # an upper bound no position or tile index reaches
_CHUNK_PAIRS = 2**22  # host bit masks are made this many (query, key) pairs at a time


class RangeTiles(NamedTuple):
    """A layout's int32 tile lists (batch 1, heads 1) in ``SparseLayout``'s field order, the
    query tile of each partial tile (what the bit kernels read) and the active pairs."""

    full_ptr: np.ndarray
    full_col: np.ndarray
    part_ptr: np.ndarray
    part_col: np.ndarray
    full_ptr_t: np.ndarray
    full_row_t: np.ndarray
    part_ptr_t: np.ndarray
    part_row_t: np.ndarray
    part_mask_t: np.ndarray
    part_qt: np.ndarray
    nnz: int


def normalized_window(q_len: int, k_len: int, left: int, right: int, sinks: int):
    """``(left, right, sinks)`` with -1 (unbounded) and over-long values replaced by the
    smallest bound that means the same for totals ``q_len`` / ``k_len``: every later sum stays
    inside int32 and needs no special case."""
    left = k_len if left < 0 or left > k_len else left
    right = q_len + k_len if right < 0 or right > q_len + k_len else right
    return left, right, min(sinks, k_len)


def _sum_clip(a, b, c, lo, hi):
    """``sum(clip(p + c, lo, hi) for p in [a, b])`` elementwise (int64 arrays, ``lo <= hi``)."""
    n = np.maximum(b - a + 1, 0)
    x0, x1 = a + c, b + c
    below = np.clip(lo - x0, 0, n)
    above = np.clip(x1 - hi, 0, n)
    m0, m1 = np.maximum(x0, lo), np.minimum(x1, hi)
    mid = np.maximum(m1 - m0 + 1, 0)
    return below * lo + above * hi + (m0 + m1) * mid // 2


def _top(p, nk, causal):
    """The last local key position ``p`` may see (-1: none)."""
    return np.minimum(nk - 1, p) if causal else nk - 1


def _csr(rows, cols, n_rows, n_cols):
    """Row pointers of tiles sorted by row, and the key-tile transpose: pointers, rows, order."""
    ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=ptr[1:])
    ptr_t = np.zeros(n_cols + 1, np.int64)
    np.cumsum(np.bincount(cols, minlength=n_cols), out=ptr_t[1:])
    # a stable sort by key tile keeps the query tiles ascending (radix sort for 16-bit keys)
    small = cols.astype(np.uint16) if n_cols <= 2**16 else cols
    order = np.argsort(small, kind="stable")
    return ptr, ptr_t, rows[order], order


def range_tiles(cu_q, cu_k, left: int, right: int, sinks: int, causal: bool, block_m: int,
                block_n: int) -> RangeTiles:
    """The tile lists of packed sequences (host int offsets ``cu_q`` / ``cu_k`` ``[S + 1]``)
    under a window ``(left, right)`` (-1 = unbounded), ``sinks`` and per-sequence causality.

    Equal, list for list, to ``mask_to_tiles`` of the dense mask: tiles of a query tile in key
    order, full = every pair active and the tile inside ``[0, Lq) x [0, Lk)``.
    """
    cu_q = np.asarray(cu_q, dtype=np.int64)
    cu_k = np.asarray(cu_k, dtype=np.int64)
    q_len, k_len = int(cu_q[-1]), int(cu_k[-1])
    left, right, sinks = normalized_window(q_len, k_len, left, right, sinks)
    bm, bn = block_m, block_n
    n_qt, n_kt = -(-q_len // bm), -(-k_len // bn)
    q0, k0 = cu_q[:-1], cu_k[:-1]
    nq, nk = cu_q[1:] - q0, cu_k[1:] - k0

    # segments: the rows of one sequence inside one query tile, in row order
    seqs = np.flatnonzero(nq > 0)
    t0 = q0[seqs] // bm
    counts = (q0[seqs] + nq[seqs] - 1) // bm - t0 + 1
    seg_seq = np.repeat(seqs, counts)
    seg_qt = np.arange(seg_seq.size) - np.repeat(np.cumsum(counts) - counts - t0, counts)
    shift = (nk - nq - q0)[seg_seq]  # row -> position p
    s_end = (q0 + nq)[seg_seq]
    pa = np.maximum(q0[seg_seq], seg_qt * bm) + shift
    pb = np.minimum(s_end, seg_qt * bm + bm) - 1 + shift
    nk_s, k0_s = nk[seg_seq], k0[seg_seq]
    top_a, top_b = _top(pa, nk_s, causal), _top(pb, nk_s, causal)

    # the key tiles a segment visits: its sinks [0, s_hi] and the union of its windows, one
    # range [lo(first row with a window), hi(last row)] because lo(p + 1) <= hi(p) + 1
    first_w = max(-right, 0) if causal else -right  # the first position with a window
    p_w = np.maximum(pa, first_w)
    has_w = (p_w <= pb) & (nk_s > 0)
    tw0 = (k0_s + np.maximum(p_w - left, 0)) // bn
    tw1 = (k0_s + np.minimum(pb + right, top_b)) // bn
    s_hi = np.minimum(sinks - 1, top_b)
    has_s = s_hi >= 0
    ts1 = (k0_s + s_hi) // bn
    merge = has_s & has_w & (tw0 <= ts1 + 1)
    a0 = np.where(has_s, k0_s // bn, tw0)
    a1 = np.where(has_s, np.where(merge, np.maximum(ts1, tw1), ts1), tw1)
    len_a = np.where(has_s | has_w, a1 - a0 + 1, 0)
    len_b = np.where(has_s & has_w & ~merge, tw1 - tw0 + 1, 0)
    lens = np.stack([len_a, len_b], 1).ravel()
    starts = np.stack([a0, tw0], 1).ravel()
    n = int(lens.sum())
    kt = np.arange(n) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
    seg = np.repeat(np.arange(seg_seq.size), len_a + len_b)
    qt = seg_qt[seg]
    per_qt = np.bincount(seg_qt, minlength=n_qt)
    if seg_seq.size > n_qt:  # tiles shared by segments of one query tile are adjacent
        key = qt * n_kt + kt
        keep = np.ones(n, bool)
        keep[1:] = key[1:] != key[:-1]
        kt, seg, qt = kt[keep], seg[keep], qt[keep]

    # full tiles: one segment in an in-range query tile, key tile inside the sequence, no
    # inactive pair above max(s_hi, hi) of the first row (it only grows) and none in the gap
    # [sinks, p - left - 1] between sinks and window of the last row (it only grows)
    hi_a = np.where((pa >= first_w) & (nk_s > 0), np.minimum(pa + right, top_a), -1)
    cap = np.maximum(np.minimum(sinks - 1, top_a), hi_a)
    single = (per_qt[seg_qt] == 1) & ((seg_qt + 1) * bm <= q_len)
    gap_end = pb - left  # the gap is [sinks, gap_end - 1]
    lo_full = -(-k0_s // bn)
    hi_full = np.where(single, (k0_s + cap + 1) // bn - 1, -_BIG)
    below_gap = (k0_s + sinks) // bn - 1
    above_gap = np.where(gap_end <= sinks, -_BIG, -(-(k0_s + gap_end) // bn))
    full = ((kt >= lo_full[seg]) & (kt <= hi_full[seg])
            & ((kt <= below_gap[seg]) | (kt >= above_gap[seg])))

    # active pairs per sequence: |[0, max(s_hi, hi)]| minus the gap, summed in closed form
    a, b = nk - nq, nk - 1  # the positions of each sequence's first and last query
    if causal:
        count = _sum_clip(a, b, 1, 0, nk)
    else:
        count = _sum_clip(a, b, right + 1, np.minimum(sinks, nk), nk)
    nnz = int((count - _sum_clip(a, b, -left - sinks, 0, _BIG)).sum())

    fq, fk = qt[full], kt[full]
    pq, pk = qt[~full], kt[~full]
    full_ptr, full_ptr_t, full_row_t, _ = _csr(fq, fk, n_qt, n_kt)
    part_ptr, part_ptr_t, part_row_t, part_mask_t = _csr(pq, pk, n_qt, n_kt)
    return RangeTiles(full_ptr, fk, part_ptr, pk, full_ptr_t, full_row_t, part_ptr_t,
                      part_row_t, part_mask_t, pq, nnz)


def range_masks_numpy(part_qt, part_col, cu_q, cu_k, left: int, right: int, sinks: int,
                      causal: bool, block_m: int, block_n: int) -> np.ndarray:
    """The bits of the partial tiles ``(part_qt, part_col)``: int32 ``[Tp, block_m, n_words]``
    (bit ``c % 32`` of word ``c // 32`` = key column ``c``), on the host."""
    cu_q = np.asarray(cu_q, dtype=np.int64)
    cu_k = np.asarray(cu_k, dtype=np.int64)
    q_len, k_len = int(cu_q[-1]), int(cu_k[-1])
    left, right, sinks = normalized_window(q_len, k_len, left, right, sinks)
    n_words = -(-block_n // 32)
    out = np.empty((len(part_qt), block_m, n_words), np.int32)
    in_tile = np.arange(n_words * 32)
    shifts = np.arange(32, dtype=np.uint32)
    step = max(1, _CHUNK_PAIRS // (block_m * n_words * 32))
    for s in range(0, len(part_qt), step):  # chunks bound the [T, block_m, 32 n_words] bools
        rows = np.asarray(part_qt[s:s + step], np.int64)[:, None] * block_m + np.arange(block_m)
        seq = np.minimum(np.searchsorted(cu_q[1:], rows, side="right"), len(cu_q) - 2)
        nk = cu_k[seq + 1] - cu_k[seq]
        p = rows - cu_q[seq] + nk - (cu_q[seq + 1] - cu_q[seq])
        top = np.where(rows < q_len, _top(p, nk, causal), -1)
        lo = np.maximum(p - left, 0)[..., None]
        hi = np.minimum(p + right, top)[..., None]
        s_hi = np.minimum(sinks - 1, top)[..., None]
        cols = np.asarray(part_col[s:s + step], np.int64)[:, None] * block_n + in_tile
        c = cols[:, None, :] - cu_k[seq][..., None]  # [T, block_m, 32 n_words] local key
        on = (c >= 0) & ((c <= s_hi) | ((c >= lo) & (c <= hi))) & (in_tile < block_n)
        words = on.reshape(*on.shape[:2], n_words, 32).astype(np.uint32) << shifts
        out[s:s + step] = words.sum(-1, dtype=np.uint32).view(np.int32)
    return out
