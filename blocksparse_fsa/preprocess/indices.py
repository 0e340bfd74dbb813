"""Per-query key indices -> tile metadata, in numba.

For every (layout batch, layout head, query tile) row we collect the key tiles its queries touch,
set one bit per exact (query, key) pair, and split the tiles into *full* ones (every pair of the
tile active: the kernels skip the mask) and *partial* ones (a bitmask of ``block_m`` rows of
``ceil(block_n / 32)`` 32-bit words). Cost is O(Lq * W) per (batch, head): no dense mask is built.

Two passes over the indices, both parallel over rows: the first counts tiles, the second writes
them at offsets given by a prefix sum. Within a row, tiles are sorted by key tile.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _popcount32(x):
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


@njit(cache=True)
def _row_tiles(idx, b, h, qt, q_len, k_len, causal_offset, is_causal, block_m, block_n, n_words,
               slot):
    """Bitmasks of the key tiles touched by one query tile.

    Returns (key tiles sorted ascending, words [n, block_m, n_words] uint32). ``slot`` is a
    scratch array of size num_k_tiles filled with -1, restored to -1 on return.
    """
    window = idx.shape[3]
    q0 = qt * block_m
    q1 = min(q0 + block_m, q_len)
    # pass a: which key tiles are touched
    touched = np.empty(min(slot.shape[0], (q1 - q0) * window + 1), dtype=np.int64)
    n = 0
    for i in range(q0, q1):
        limit = i + causal_offset
        for w in range(window):
            j = idx[b, h, i, w]
            if j < 0 or j >= k_len or (is_causal and j > limit):
                continue
            kt = j // block_n
            if slot[kt] < 0:
                slot[kt] = 0
                touched[n] = kt
                n += 1
    tiles = np.sort(touched[:n])
    for t in range(n):
        slot[tiles[t]] = t
    # pass b: the exact pairs
    words = np.zeros((n, block_m, n_words), dtype=np.uint32)
    for i in range(q0, q1):
        limit = i + causal_offset
        for w in range(window):
            j = idx[b, h, i, w]
            if j < 0 or j >= k_len or (is_causal and j > limit):
                continue
            c = j % block_n
            words[slot[j // block_n], i - q0, c >> 5] |= np.uint32(1) << np.uint32(c & 31)
    for t in range(n):
        slot[tiles[t]] = -1
    return tiles, words


@njit(cache=True, inline="always")
def _tile_is_full(words, t, qt, kt, q_len, k_len, block_m, block_n, n_words):
    if (qt + 1) * block_m > q_len or (kt + 1) * block_n > k_len:
        return False
    full_word = np.uint32(0xFFFFFFFF) if block_n >= 32 else np.uint32((1 << block_n) - 1)
    for r in range(block_m):
        for w in range(n_words):
            if words[t, r, w] != full_word:
                return False
    return True


@njit(parallel=True, cache=True)
def count_tiles(idx, q_len, k_len, causal_offset, is_causal, block_m, block_n, n_words):
    """Pass 1: per row (b, h, qt) the number of full tiles, partial tiles and active pairs."""
    n_b, n_h = idx.shape[0], idx.shape[1]
    n_qt = (q_len + block_m - 1) // block_m
    n_kt = (k_len + block_n - 1) // block_n
    n_rows = n_b * n_h * n_qt
    n_full = np.zeros(n_rows, dtype=np.int64)
    n_part = np.zeros(n_rows, dtype=np.int64)
    nnz = np.zeros(n_rows, dtype=np.int64)
    for r in prange(n_rows):
        b = r // (n_h * n_qt)
        h = (r // n_qt) % n_h
        qt = r % n_qt
        slot = np.full(n_kt, -1, dtype=np.int64)
        tiles, words = _row_tiles(idx, b, h, qt, q_len, k_len, causal_offset, is_causal,
                                  block_m, block_n, n_words, slot)
        for t in range(tiles.shape[0]):
            if _tile_is_full(words, t, qt, tiles[t], q_len, k_len, block_m, block_n, n_words):
                n_full[r] += 1
            else:
                n_part[r] += 1
            for m in range(block_m):
                for w in range(n_words):
                    nnz[r] += _popcount32(words[t, m, w])
    return n_full, n_part, nnz


@njit(parallel=True, cache=True)
def fill_tiles(idx, q_len, k_len, causal_offset, is_causal, block_m, block_n, n_words,
               full_ptr, part_ptr, full_col, part_col, masks):
    """Pass 2: write key tiles (and partial tiles' bitmasks) at the offsets of pass 1."""
    n_b, n_h = idx.shape[0], idx.shape[1]
    n_qt = (q_len + block_m - 1) // block_m
    n_kt = (k_len + block_n - 1) // block_n
    n_rows = n_b * n_h * n_qt
    for r in prange(n_rows):
        b = r // (n_h * n_qt)
        h = (r // n_qt) % n_h
        qt = r % n_qt
        slot = np.full(n_kt, -1, dtype=np.int64)
        tiles, words = _row_tiles(idx, b, h, qt, q_len, k_len, causal_offset, is_causal,
                                  block_m, block_n, n_words, slot)
        f = full_ptr[r]
        p = part_ptr[r]
        for t in range(tiles.shape[0]):
            if _tile_is_full(words, t, qt, tiles[t], q_len, k_len, block_m, block_n, n_words):
                full_col[f] = tiles[t]
                f += 1
            else:
                part_col[p] = tiles[t]
                masks[p] = words[t]
                p += 1


def indices_to_tiles(idx, q_len, k_len, is_causal, block_m, block_n):
    """Run both passes on a NumPy index array ``(Bl, Hl, Lq, W)``.

    Returns ``full_ptr, full_col, part_ptr, part_col, masks, nnz`` as NumPy arrays (pointers
    int64, columns int32, masks ``[Tp, block_m, n_words]`` uint32, ``nnz`` the number of active
    pairs summed over rows).
    """
    n_words = (block_n + 31) // 32
    causal_offset = k_len - q_len
    n_full, n_part, nnz = count_tiles(idx, q_len, k_len, causal_offset, is_causal,
                                      block_m, block_n, n_words)
    full_ptr = np.zeros(n_full.shape[0] + 1, dtype=np.int64)
    part_ptr = np.zeros(n_part.shape[0] + 1, dtype=np.int64)
    np.cumsum(n_full, out=full_ptr[1:])
    np.cumsum(n_part, out=part_ptr[1:])
    full_col = np.empty(full_ptr[-1], dtype=np.int32)
    part_col = np.empty(part_ptr[-1], dtype=np.int32)
    masks = np.empty((part_ptr[-1], block_m, n_words), dtype=np.uint32)
    fill_tiles(idx, q_len, k_len, causal_offset, is_causal, block_m, block_n, n_words,
               full_ptr, part_ptr, full_col, part_col, masks)
    return full_ptr, full_col, part_ptr, part_col, masks, int(nnz.sum())


@njit(cache=True)
def transpose_csr(ptr, col, n_groups, n_rows_per_group, n_cols_per_group):
    """Query-tile CSR -> key-tile CSR, per (batch, head) group; rows stay sorted ascending.

    ``ptr`` has ``n_groups * n_rows_per_group + 1`` entries. Returns ``(ptr_t, row_t, perm)``
    where ``perm[t]`` is the position in ``col`` of the t-th transposed entry.
    """
    n_rows_t = n_groups * n_cols_per_group
    counts = np.zeros(n_rows_t + 1, dtype=np.int64)
    for r in range(ptr.shape[0] - 1):
        g = r // n_rows_per_group
        for t in range(ptr[r], ptr[r + 1]):
            counts[g * n_cols_per_group + col[t] + 1] += 1
    ptr_t = np.cumsum(counts)
    fill = ptr_t[:-1].copy()
    row_t = np.empty(col.shape[0], dtype=np.int32)
    perm = np.empty(col.shape[0], dtype=np.int32)
    for r in range(ptr.shape[0] - 1):
        g = r // n_rows_per_group
        for t in range(ptr[r], ptr[r + 1]):
            dst = g * n_cols_per_group + col[t]
            row_t[fill[dst]] = r % n_rows_per_group
            perm[fill[dst]] = t
            fill[dst] += 1
    return ptr_t, row_t, perm
