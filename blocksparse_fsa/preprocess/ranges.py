"""Tile metadata of packed sequences whose query rows each see at most two contiguous key ranges
of their own sequence: a FlashAttention window (clipped by causality) and attention sinks.

Query ``a`` (local) of sequence ``s`` has position ``p = a + Lk_s - Lq_s`` (bottom-right
aligned) and sees local keys ``[0, min(sinks - 1, T)]`` and ``[max(p - left, 0), min(p + right,
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


def _sum_clip(a, b, c, lo, hi, mx=np.maximum, mn=np.minimum):
    """``sum(clip(p + c, lo, hi) for p in [a, b])`` elementwise (``lo <= hi``): int64 arrays,
    or Python ints with ``mx=max, mn=min``."""
    n = mx(b - a + 1, 0)
    x0, x1 = a + c, b + c
    below = mn(mx(lo - x0, 0), n)
    above = mn(mx(x1 - hi, 0), n)
    m0, m1 = mx(x0, lo), mn(x1, hi)
    mid = mx(m1 - m0 + 1, 0)
    return below * lo + above * hi + (m0 + m1) * mid // 2


def _top(p, nk, causal):
    """The last local key position ``p`` may see (-1: none)."""
    return np.minimum(nk - 1, p) if causal else nk - 1


def _tile_lists(full_s, full_e, part_s, part_e, seg_qt, n_qt, n_kt, last_seg):
    """Expand intervals of key tiles (``[n_seg, k]`` starts and ends per kind, sorted and
    disjoint within a query tile, empty where end < start) into both kinds' CSR of the query
    tiles ``seg_qt`` and their key-tile transposes, with one expansion and one sort for all
    tiles (full ones first). ``last_seg``: each query tile's last segment, or None when every
    query tile has one. Returns the lists in ``RangeTiles`` order, then ``part_qt``."""
    k_f, k_p = full_s.shape[1], part_s.shape[1]
    starts = np.concatenate([full_s.ravel(), part_s.ravel()])
    lens = np.maximum(np.concatenate([full_e.ravel(), part_e.ravel()]) - starts + 1, 0)
    first = np.cumsum(lens)
    n = int(first[-1])
    n_full = int(first[full_s.size - 1])
    cols = np.arange(n) + np.repeat(starts - (first - lens), lens)
    rows = np.repeat(np.concatenate([np.repeat(seg_qt, k_f), np.repeat(seg_qt, k_p)]), lens)
    ptrs = []
    for ends in (first[k_f - 1:full_s.size:k_f], first[full_s.size + k_p - 1::k_p] - n_full):
        ptr = np.zeros(n_qt + 1, np.int64)  # tiles up to each segment's end, per query tile
        ptr[1:] = ends if last_seg is None else ends[last_seg]
        ptrs.append(ptr)
    # tiles per (kind, key tile): +1 where an interval starts, -1 past its end (empty ones
    # cancel); the sort key is kind * n_kt + key tile, so the full tiles come first
    kind = np.repeat(np.array([0, n_kt]), [full_s.size, part_s.size])
    s = np.minimum(starts, n_kt) + kind
    cover = np.bincount(s, minlength=2 * n_kt + 1) - np.bincount(s + lens,
                                                                 minlength=2 * n_kt + 1)
    ptr_t = np.zeros(2 * n_kt + 1, np.int64)
    np.cumsum(np.cumsum(cover[:2 * n_kt]), out=ptr_t[1:])
    # a stable sort keeps the query tiles ascending (a radix sort for 16-bit keys)
    key = cols.astype(np.uint16 if 2 * n_kt <= 2**16 else np.int64)
    key[n_full:] += n_kt
    order = np.argsort(key, kind="stable")
    row_t = rows[order]
    return (ptrs[0], cols[:n_full], ptrs[1], cols[n_full:], ptr_t[:n_kt + 1], row_t[:n_full],
            ptr_t[n_kt:] - n_full, row_t[n_full:], order[n_full:] - n_full, rows[n_full:])


def range_tiles(cu_q, cu_k, left: int, right: int, sinks: int, causal: bool, block_m: int,
                block_n: int) -> RangeTiles:
    """The tile lists of packed sequences (host int offsets ``cu_q`` / ``cu_k`` ``[S + 1]``)
    under a window ``(left, right)`` (-1 = unbounded), ``sinks`` and per-sequence causality.

    Equal, list for list, to ``mask_to_tiles`` of the dense mask: tiles of a query tile in key
    order, full = every pair active and the tile inside ``[0, Lq) x [0, Lk)``. Works on
    intervals of key tiles per segment; only the final lists are per tile.
    """
    one = len(cu_q) == 2  # a lone sequence: its values stay Python ints (they broadcast)
    q_len, k_len = int(cu_q[-1]), int(cu_k[-1])
    left, right, sinks = normalized_window(q_len, k_len, left, right, sinks)
    bm, bn = block_m, block_n
    n_qt, n_kt = -(-q_len // bm), -(-k_len // bn)

    # segments: the rows of one sequence inside one query tile, in row order
    seg_qt = np.arange(n_qt)
    per_qt = last_seg = None
    if one:
        nk_s, k0_s = k_len, 0
        pa = seg_qt * bm + (k_len - q_len)  # row -> position p
        pb = np.minimum(pa + (bm - 1), k_len - 1)
    else:
        cu_q = np.asarray(cu_q, dtype=np.int64)
        cu_k = np.asarray(cu_k, dtype=np.int64)
        q0, k0 = cu_q[:-1], cu_k[:-1]
        nq, nk = cu_q[1:] - q0, cu_k[1:] - k0
        seqs = np.flatnonzero(nq > 0)
        t0 = q0[seqs] // bm
        counts = (q0[seqs] + nq[seqs] - 1) // bm - t0 + 1
        seg_seq = np.repeat(seqs, counts)
        seg_qt = np.arange(seg_seq.size) - np.repeat(np.cumsum(counts) - counts - t0, counts)
        shift = (nk - nq - q0)[seg_seq]
        pa = np.maximum(q0[seg_seq], seg_qt * bm) + shift
        pb = np.minimum((q0 + nq)[seg_seq], seg_qt * bm + bm) - 1 + shift
        nk_s, k0_s = nk[seg_seq], k0[seg_seq]
        if seg_seq.size > n_qt:  # some query tile holds rows of several sequences
            per_qt = np.bincount(seg_qt, minlength=n_qt)
            last_seg = np.cumsum(per_qt) - 1
    top_a, top_b = _top(pa, nk_s, causal), _top(pb, nk_s, causal)

    # the key tiles a segment visits: its sinks [0, s_hi] and the union of its windows, one
    # range [lo(first row with a window), hi(last row)] because lo(p + 1) <= hi(p) + 1
    first_w = max(-right, 0) if causal else -right  # the first position with a window
    p_w = np.maximum(pa, first_w)
    has_w = (p_w <= pb) & (nk_s > 0)
    tw0 = np.where(has_w, (k0_s + np.maximum(p_w - left, 0)) // bn, 0)
    tw1 = np.where(has_w, (k0_s + np.minimum(pb + right, top_b)) // bn, -1)
    if sinks:
        s_hi = np.minimum(sinks - 1, top_b)
        has_s = s_hi >= 0
        ts1 = np.where(has_s, (k0_s + s_hi) // bn, -1)
        merge = has_s & has_w & (tw0 <= ts1 + 1)
        two = has_s & has_w & ~merge
        active = [(np.where(has_s, k0_s // bn, tw0),
                   np.where(merge, np.maximum(ts1, tw1), np.where(has_s, ts1, tw1))),
                  (np.where(two, tw0, 0), np.where(two, tw1, -1))]
    else:
        active = [(tw0, tw1)]

    # full tiles: one segment in an in-range query tile, key tile inside the sequence, no
    # inactive pair above max(s_hi, hi) of the first row (it only grows) and none in the gap
    # [sinks, p - left - 1] between sinks and window of the last row (it only grows)
    hi_a = np.where((pa >= first_w) & (nk_s > 0), np.minimum(pa + right, top_a), -1)
    cap = np.maximum(np.minimum(sinks - 1, top_a), hi_a)
    lo_f = -(-k0_s // bn)
    hi_f = (k0_s + cap + 1) // bn - 1
    if q_len % bm:  # a ragged last query tile (the last segment) has no full tile
        hi_f[-1] = -1
    if per_qt is not None:  # nor has a query tile of several sequences
        hi_f = np.where(per_qt[seg_qt] == 1, hi_f, -1)
    gap_end = pb - left  # the gap is [sinks, gap_end - 1]
    above = -(-(k0_s + gap_end) // bn)  # the first key tile after it
    if sinks:  # full tiles below the gap and above it
        below = (k0_s + sinks) // bn - 1  # the last key tile before the gap
        joined = (gap_end <= sinks) | (above <= below + 1)  # no key tile inside the gap
        f2_s = np.where(joined, lo_f, np.maximum(lo_f, above))
        full = [(lo_f, np.where(joined, -1, np.minimum(hi_f, below))), (f2_s, hi_f)]
    else:  # below the gap is no key (when there is no gap, above <= lo_f)
        full = [(np.maximum(lo_f, above), hi_f)]
    full = _sorted_nonempty(full)

    # partial tiles: each active interval minus the full ones
    part_s, part_e = _minus(active, full)
    if per_qt is not None:  # a key tile shared by neighbouring sequences is listed once
        base = seg_qt[:, None] * n_kt
        ends = np.maximum.accumulate((part_e + base).ravel())
        prev = np.concatenate([[-1], ends[:-1]]).reshape(part_s.shape) - base
        part_s = np.maximum(part_s, prev + 1)
    lists = _tile_lists(np.stack([s for s, _ in full], 1), np.stack([e for _, e in full], 1),
                        part_s, part_e, seg_qt, n_qt, n_kt, last_seg)

    # active pairs per sequence: |[0, max(s_hi, hi)]| (clip(p + c, lo, nk)) minus the gap
    # (clip(p - left - sinks, 0, inf)), summed in closed form; Python ints for one sequence
    if one:
        a, b, n_k, mx, mn = k_len - q_len, k_len - 1, k_len, max, min
    else:
        a, b, n_k, mx, mn = nk - nq, nk - 1, nk, np.maximum, np.minimum
    c, lo = (1, 0) if causal else (right + 1, mn(sinks, n_k))
    pairs = (_sum_clip(a, b, c, lo, n_k, mx, mn)
             - _sum_clip(a, b, -left - sinks, 0, _BIG, mx, mn))
    nnz = pairs if one else int(pairs.sum())
    return RangeTiles(*lists, nnz)


def _sorted_nonempty(intervals):
    """Disjoint sorted intervals ``[(starts, ends)]`` with each empty one moved to just
    before the next (``[s, s - 1]``, the last at ``_BIG``), so that :func:`_minus` can cut
    around them blindly."""
    out, nxt = [], _BIG
    for s, e in reversed(intervals):
        empty = e < s
        s = np.where(empty, nxt, s)
        out.append((s, np.where(empty, s - 1, e)))
        nxt = s
    return out[::-1]


def _minus(active, full):
    """``[n_seg, k]`` starts and ends of the pieces of the ``active`` intervals outside the
    ``full`` ones (both lists sorted and disjoint, the full ones inside the active ones)."""
    starts, ends = [], []
    for s, e in active:
        starts.append(s)
        for f_s, f_e in full:
            ends.append(np.minimum(e, f_s - 1))
            starts.append(np.maximum(s, f_e + 1))
        ends.append(e)
    return np.stack(starts, 1), np.stack(ends, 1)


def range_masks_numpy(part_qt, part_col, cu_q, cu_k, left: int, right: int, sinks: int,
                      causal: bool, block_m: int, block_n: int) -> np.ndarray:
    """The bits of the partial tiles ``(part_qt, part_col)``: int32 ``[Tp, block_m, n_words]``
    (bit ``c % 32`` of word ``c // 32`` = key column ``c``), on the host, a word at a time
    from each row's two global key ranges (no per-pair array)."""
    cu_q = np.asarray(cu_q, dtype=np.int64)
    cu_k = np.asarray(cu_k, dtype=np.int64)
    q_len, k_len = int(cu_q[-1]), int(cu_k[-1])
    left, right, sinks = normalized_window(q_len, k_len, left, right, sinks)
    n_words = -(-block_n // 32)
    rows = np.asarray(part_qt, np.int64)[:, None] * block_m + np.arange(block_m)  # [Tp, bm]
    seq = np.minimum(np.searchsorted(cu_q[1:], rows, side="right"), len(cu_q) - 2)
    k0, nk = cu_k[seq], cu_k[seq + 1] - cu_k[seq]
    p = rows - cu_q[seq] + nk - (cu_q[seq + 1] - cu_q[seq])
    top = np.where(rows < q_len, _top(p, nk, causal), -1)
    col0 = np.asarray(part_col, np.int64)[:, None] * block_n  # the tile's first key
    # global [first, last + 1) of the window and of the sinks, clipped to the tile
    col1 = col0 + block_n
    ranges = [(np.maximum(k0 + np.maximum(p - left, 0), col0),
               np.minimum(k0 + np.minimum(p + right, top) + 1, col1)),
              (np.maximum(k0, col0), np.minimum(k0 + np.minimum(sinks - 1, top) + 1, col1))]
    out = np.zeros((rows.shape[0], block_m, n_words), np.uint64)
    one = np.uint64(1)
    for w in range(n_words):  # bits [a, b) of each word: (1 << b) - (1 << a)
        base = col0 + 32 * w
        for first, end in ranges:
            a = np.clip(first - base, 0, 32).astype(np.uint64)
            b = np.clip(end - base, 0, 32).astype(np.uint64)
            out[:, :, w] |= np.where(b > a, (one << b) - (one << a), 0).astype(np.uint64)
    return out.astype(np.uint32).view(np.int32)
