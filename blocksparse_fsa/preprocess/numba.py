"""Per-query key indices -> tile metadata, in numba.

For every (layout batch, layout head, query tile) row we collect the key tiles its queries touch,
set one bit per exact (query, key) pair, and split the tiles into *full* ones (every pair of the
tile active: the kernels skip the mask) and *partial* ones (a bitmask of ``block_m`` rows of
``ceil(block_n / 32)`` 32-bit words). Cost is O(Lq * W) per (batch, head): no dense mask is built.

Two passes over the indices, both parallel over chunks of rows: the first counts tiles, the
second writes them at offsets given by a prefix sum. Each chunk owns a scratch bitmap of one
row's key tiles, cleared tile by tile after use. Within a row, tiles are sorted by key tile.

Importing this module imports numba (about a second), so the package imports it on the first
CPU build only. numba compiles these functions on their first call on a machine and caches
the result next to this file; that first build logs one line on the ``blocksparse_fsa``
logger (a warning, so it shows without logging set up) saying that it is compiling.
"""

import logging
import os

import numpy as np
from numba import njit, prange

logger = logging.getLogger("blocksparse_fsa")


@njit(cache=True, inline="always")
def _popcount32(x):
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


@njit(cache=True)
def _scan_row(idx, b, h, qt, q_len, k_len, causal_offset, is_causal, block_m, shift_n,
              touched, scratch):
    """Set the bits of query tile ``qt`` in ``scratch[kt]`` (``[n_kt, block_m, n_words]``).

    Returns the touched key tiles, sorted. ``scratch`` must be all zero on entry; the caller
    clears the touched tiles (``_clear``) once it has read them. Block sizes are powers of two,
    so tile and column come from a shift and a mask, not a division.
    """
    window = idx.shape[3]
    low_n = (1 << shift_n) - 1
    q0 = qt * block_m
    q1 = min(q0 + block_m, q_len)
    n = 0
    for i in range(q0, q1):
        limit = i + causal_offset
        r = i - q0
        for w in range(window):
            j = idx[b, h, i, w]
            if j < 0 or j >= k_len or (is_causal and j > limit):
                continue
            kt = j >> shift_n
            c = j & low_n
            if touched[kt] < 0:  # touched[] doubles as the "seen" flag: -1 = not yet
                touched[kt] = n
                n += 1
            scratch[kt, r, c >> 5] |= np.uint32(1) << np.uint32(c & 31)
    tiles = np.empty(n, dtype=np.int64)
    n = 0
    for kt in range(touched.shape[0]):
        if touched[kt] >= 0:
            tiles[n] = kt
            n += 1
    return tiles


@njit(cache=True, inline="always")
def _clear(tiles, touched, scratch):
    for kt in tiles:
        touched[kt] = -1
        scratch[kt] = 0


@njit(cache=True, inline="always")
def _tile_is_full(words, qt, kt, q_len, k_len, block_m, block_n):
    """All pairs of an in-range tile active (``words`` is its ``[block_m, n_words]`` bitmask)."""
    if (qt + 1) * block_m > q_len or (kt + 1) * block_n > k_len:
        return False
    full_word = np.uint32(0xFFFFFFFF) if block_n >= 32 else np.uint32((1 << block_n) - 1)
    for r in range(words.shape[0]):
        for w in range(words.shape[1]):
            if words[r, w] != full_word:
                return False
    return True


@njit(cache=True)
def _chunks(n_rows):
    """Row ranges for the parallel loop: a scratch buffer is allocated once per chunk."""
    n_chunks = max(1, min(n_rows, 64))
    bounds = np.empty(n_chunks + 1, dtype=np.int64)
    for c in range(n_chunks + 1):
        bounds[c] = c * n_rows // n_chunks
    return bounds


@njit(parallel=True, cache=True)
def _tile_pass(idx, q_len, k_len, causal_offset, is_causal, block_m, shift_n, n_words, write,
               n_full, n_part, nnz, full_ptr, part_ptr, full_col, part_col, masks):
    """One parallel scan of every row (b, h, qt).

    ``write=False`` (pass 1): count each row's full tiles, partial tiles and active pairs into
    ``n_full``, ``n_part``, ``nnz``. ``write=True`` (pass 2): write the tiles, and the partial
    tiles' bitmasks, at the offsets ``full_ptr`` / ``part_ptr`` that pass 1's counts gave.
    """
    n_b, n_h = idx.shape[0], idx.shape[1]
    block_n = 1 << shift_n
    n_qt = (q_len + block_m - 1) // block_m
    n_kt = (k_len + block_n - 1) // block_n
    bounds = _chunks(n_b * n_h * n_qt)
    for c in prange(bounds.shape[0] - 1):
        touched = np.full(n_kt, -1, dtype=np.int64)
        scratch = np.zeros((n_kt, block_m, n_words), dtype=np.uint32)
        for r in range(bounds[c], bounds[c + 1]):
            b, h, qt = r // (n_h * n_qt), (r // n_qt) % n_h, r % n_qt
            tiles = _scan_row(idx, b, h, qt, q_len, k_len, causal_offset, is_causal, block_m,
                              shift_n, touched, scratch)
            f, p = (full_ptr[r], part_ptr[r]) if write else (0, 0)
            for kt in tiles:
                full = _tile_is_full(scratch[kt], qt, kt, q_len, k_len, block_m, block_n)
                if write and full:
                    full_col[f] = kt
                elif write:
                    part_col[p] = kt
                    masks[p] = scratch[kt]
                else:
                    for m in range(block_m):
                        for w in range(n_words):
                            nnz[r] += _popcount32(scratch[kt, m, w])
                if full:
                    f += 1
                else:
                    p += 1
            if not write:
                n_full[r], n_part[r] = f, p
            _clear(tiles, touched, scratch)


def indices_to_tiles(idx, q_len, k_len, is_causal, block_m, block_n):
    """Run both passes on a NumPy index array ``(Bl, Hl, Lq, W)``.

    Returns ``full_ptr, full_col, part_ptr, part_col, masks, nnz`` as NumPy arrays (pointers
    int64, columns int32, masks ``[Tp, block_m, n_words]`` uint32, ``nnz`` the number of active
    pairs summed over rows). ``block_n`` must be a power of two.
    """
    _announce_compilation()
    n_words = (block_n + 31) // 32
    shift_n = block_n.bit_length() - 1
    assert 1 << shift_n == block_n, "block_n must be a power of two"
    causal_offset = k_len - q_len
    n_rows = idx.shape[0] * idx.shape[1] * ((q_len + block_m - 1) // block_m)
    counts = [np.zeros(n_rows, dtype=np.int64) for _ in range(3)]  # full, partial, pairs
    ptrs = [np.zeros(n_rows + 1, dtype=np.int64) for _ in range(2)]
    common = (idx, q_len, k_len, causal_offset, is_causal, block_m, shift_n, n_words)
    no_masks = np.empty((0, block_m, n_words), dtype=np.uint32)
    no_cols = np.empty(0, dtype=np.int32)
    _tile_pass(*common, False, *counts, *ptrs, no_cols, no_cols, no_masks)
    n_full, n_part, nnz = counts
    full_ptr, part_ptr = ptrs
    np.cumsum(n_full, out=full_ptr[1:])
    np.cumsum(n_part, out=part_ptr[1:])
    full_col = np.empty(full_ptr[-1], dtype=np.int32)
    part_col = np.empty(part_ptr[-1], dtype=np.int32)
    masks = np.empty((part_ptr[-1], block_m, n_words), dtype=np.uint32)
    _tile_pass(*common, True, *counts, full_ptr, part_ptr, full_col, part_col, masks)
    return full_ptr, full_col, part_ptr, part_col, masks, int(nnz.sum())


_announced = False


def _announce_compilation():
    """Log once per process when numba has no cached machine code for the build yet (its
    cache index is missing): the build about to run compiles first, which takes seconds."""
    global _announced
    if _announced or _tile_pass.signatures:
        return
    _announced = True
    try:
        cached = os.path.exists(_tile_pass._cache._cache_file._index_path)
    except AttributeError:  # another numba's cache layout: say nothing rather than guess
        return
    if not cached:
        logger.warning("blocksparse_fsa: compiling the CPU layout builder with numba (once "
                       "per machine and numba version, 10-60 s; cached in %s)",
                       os.path.dirname(_tile_pass._cache._cache_file._index_path))
