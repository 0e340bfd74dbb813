"""Tile metadata of packed sequences whose query rows each see at most two contiguous key ranges
of their own sequence: a FlashAttention window (clipped by causality) and attention sinks.

Query ``a`` (local) of sequence ``s`` has position ``p = a + Lk_s - Lq_s`` (bottom-right
aligned) and sees local keys ``[0, min(sinks - 1, T)]`` and ``[max(p - left, 0), min(p + right,
T)]``, ``T = Lk_s - 1`` (``min(Lk_s - 1, p)`` when causal). Both bounds grow with ``p``, so the
key tiles a (query tile, sequence) *segment* visits, which of them are full and the number of
active pairs are closed-form in the segment's first and last rows: :func:`range_tiles` builds the
whole CSR and its transpose on the host (scalar loops in ``ranges_numba``, O(tiles +
sequences)), so every size is known before anything reaches a device. Only the partial tiles'
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
    query tile of each partial tile (what the bit kernels read) and the active pairs; the
    lists are views of ``buffer``, which also holds the bit kernel's header and offsets."""

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
    buffer: np.ndarray  # every list above, then cu_q and cu_k: int32, each 16-byte aligned
    starts: list  # where each of those twelve lists starts in ``buffer``


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


def range_tiles(cu_q, cu_k, left: int, right: int, sinks: int, causal: bool, block_m: int,
                block_n: int) -> RangeTiles:
    """The tile lists of packed sequences (host int offsets ``cu_q`` / ``cu_k`` ``[S + 1]``)
    under a window ``(left, right)`` (-1 = unbounded), ``sinks`` and per-sequence causality.

    Equal, list for list, to ``mask_to_tiles`` of the dense mask: tiles of a query tile in key
    order, full = every pair active and the tile inside ``[0, Lq) x [0, Lk)``. The lists come
    from each segment's key-tile intervals (``preprocess.ranges_numba``); ``nnz`` is a closed
    form in the offsets.
    """
    from .ranges_numba import range_lists  # numba loads on the first analytic layout

    q_len, k_len = int(cu_q[-1]), int(cu_k[-1])
    left, right, sinks = normalized_window(q_len, k_len, left, right, sinks)
    n_qt, n_kt = -(-q_len // block_m), -(-k_len // block_n)
    cq, ck = np.asarray(cu_q, dtype=np.int64), np.asarray(cu_k, dtype=np.int64)
    buffer, starts, sizes = range_lists(cq, ck, left, right, sinks, bool(causal), block_m,
                                        block_n, n_qt, n_kt)
    lists = [buffer[a:a + n] for a, n in zip(starts.tolist(), sizes.tolist())]

    # active pairs per sequence: |[0, max(s_hi, hi)]| (clip(p + c, lo, nk)) minus the gap
    # (clip(p - left - sinks, 0, inf)), summed in closed form; Python ints for one sequence
    if len(cu_q) == 2:
        a, b, n_k, mx, mn = k_len - q_len, k_len - 1, k_len, max, min
    else:
        nq, nk = np.diff(cq), np.diff(ck)
        a, b, n_k, mx, mn = nk - nq, nk - 1, nk, np.maximum, np.minimum
    c, lo = (1, 0) if causal else (right + 1, mn(sinks, n_k))
    pairs = (_sum_clip(a, b, c, lo, n_k, mx, mn)
             - _sum_clip(a, b, -left - sinks, 0, _BIG, mx, mn))
    return RangeTiles(*lists[:10], int(pairs if len(cu_q) == 2 else pairs.sum()), buffer,
                      starts.tolist())


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
