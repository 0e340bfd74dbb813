"""Per-query key indices -> tile metadata in Triton, on the indices' GPU.

The same layout as the numba path (``indices.py``) and the PyTorch path (``device.py``), tensor
for tensor, from five kernels and no sort, with one host sync (``layout_tensors_triton`` says
where). A *row* is one (layout batch, layout head, query tile) with ``block_m`` queries of
``width`` index slots each; persistent programs take rows in turn. A program reads its row's
indices in ``[block_m, CHUNK]`` chunks and ORs their bits into a bitmap of ``[block_m, SPAN]``
32-bit key words starting at a tile-aligned word ``base`` (a *span*), kept in the program's
own scratch in global memory (L2).
Triton has no register scatter, so a chunk goes in by *steps*: each step takes every query's
smallest word ``m`` not merged yet, ORs the bits of its words ``m`` and ``m + 1`` (reductions
over the chunk) and adds them to the scratch with one relaxed atomic OR each. A query's 32
consecutive keys (a sliding window, in either order) take one step.

* ``indices_to_tiles_count_kernel``: centres the first span on the words of the row's first
  and last chunk, scans, and opens further spans below or above the covered words for indices
  outside; per row it writes the numbers of full and partial tiles and where pass 2 starts,
  and adds the active pairs, the tiles and the out-of-range indices to global counters. A row
  that one span held keeps its tiles, sorted, in a pool (slots from an atomic counter, up to
  a budget). Where ``CHUNK`` divides the width it first tries the *fast scan*: one step per
  chunk, assuming every query's active words there are two consecutive ones in the span,
  with vectorized loads through a ``cp.async`` pipeline and the atomics issued in the
  reduction's layout (``_or_into``); a row that breaks the assumption is cleared and scanned
  the general way. Before that, the *window scan* (``_window_scan``) checks whether every
  query's slots hold one ascending run of keys (a sliding window written as ``i - W + 1 +
  arange(W)``, -1 outside ``[0, k_len)``) at a few operations per index, and builds such a
  row's bitmap in registers.
* ``indices_to_tiles_write_kernel``: writes the CSR pointers (each program sums the counts
  of the rows before its own), copies pooled rows to their CSR offsets and rescans the others
  in ascending spans from their first word, writing each tile's key (``device.transpose_keys``:
  its key tile and query tile) and counting the tiles of each key tile.
* The key-tile lists: ``column_pointers_kernel`` turns those counts into the lists' pointers,
  ``place_tiles_kernel`` puts each tile in its list at a slot from an atomic counter, and
  ``rank_tiles_kernel`` orders each list by query tile (each entry's rank: how many entries of
  its list are smaller; the query tiles of a list are distinct, so the result is the same
  every time).

Memory: O(rows + key tiles) counters, the programs' scratch (programs x block_m x SPAN words),
the pool (at most ``POOL_BYTES``) and O(tiles) for the lists: nothing of size Lq x Lk or
(query tiles x key tiles).
"""

import collections
import functools
import os

import torch
import triton
import triton.language as tl

from ..kernels import common
from ..kernels import config as launch_config
from ..kernels.launch import Launcher
from .device import transpose_key_dtype

BIG = tl.constexpr(1 << 30)  # no word: above every real word (< 2**27)
POOL_BYTES = 2**28  # pass 2 rescans the rows that do not fit
LAST_BUILD = {}  # rows of the last build, and how many the fast scan gave to the general one


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _or_rows(x, BY_BITS: tl.constexpr, KEEP_DIMS: tl.constexpr = True):
    """OR along axis 1 of a ``[M, C]`` uint32 tensor -> ``[M, 1]`` (``[M]`` without
    ``KEEP_DIMS``). ``BY_BITS``: the CPU interpreter runs a custom reduction element by element
    in Python, so there it is a max per bit (numpy)."""
    if BY_BITS:
        shifts = tl.arange(0, 32).to(tl.uint32)
        bits = tl.max((x[:, :, None] >> shifts[None, None, :]) & 1, 1)  # [M, 32]
        return tl.sum(bits << shifts[None, :], 1, keep_dims=KEEP_DIMS)
    else:
        return tl.reduce(x, 1, _or, keep_dims=KEEP_DIMS)


@triton.jit
def _load_chunk(row_ptr, row_ok, c0, n_cols, stride_idx_w, CHUNK: tl.constexpr):
    """Raw indices of slots ``[c0, c0 + CHUNK)`` below ``n_cols`` of the row's queries, -1
    elsewhere: ``[BLOCK_M, CHUNK]`` in the indices' dtype."""
    cols = c0 + tl.arange(0, CHUNK)
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    return tl.load(row_ptr[:, None] + cols[None, :].to(tl.int64) * stride_idx_w, mask=ok,
                   other=-1)


@triton.jit
def _classify(j, bound, k_len):
    """Raw indices ``[BLOCK_M, CHUNK]`` -> (as int32; active: in ``[0, bound[r])``, where
    ``bound[r]`` is one past query r's last allowed key (causal) or k_len; in ``[-1, k_len)``:
    -1 and causally dropped keys are inactive, anything else outside is an error)."""
    j32 = j.to(tl.int32)
    active = j32.to(tl.uint32, bitcast=True) < bound[:, None].to(tl.uint32, bitcast=True)
    if j.dtype == tl.int64:  # and it fits in int32
        active = active & (j == j32)
    return j32, active, (j >= -1) & (j < k_len)


@triton.jit
def _words(j, bound, k_len, LOG_WB: tl.constexpr):
    """Raw indices -> (key word, BIG unless the index is active; whether it lies outside
    ``[-1, k_len)``)."""
    j32, active, in_range = _classify(j, bound, k_len)
    return tl.where(active, j32 >> LOG_WB, BIG), in_range == 0


@triton.jit
def _merge_step(rel, bit, m, bitmap_rows, SPAN: tl.constexpr, BY_BITS: tl.constexpr):
    """OR the bits of each query's words ``m`` and ``m + 1`` (``[BLOCK_M, 1]``, relative to the
    span) into the scratch bitmap; return each query's next word (SPAN + 1 / SPAN + 2 when
    done)."""
    lo = _or_rows(tl.where(rel == m, bit, 0), BY_BITS)  # [BLOCK_M, 1]
    hi = _or_rows(tl.where(rel == m + 1, bit, 0), BY_BITS)
    tl.atomic_or(bitmap_rows + m, lo, mask=m < SPAN, sem="relaxed")
    tl.atomic_or(bitmap_rows + m + 1, hi, mask=(m < SPAN) & (hi != 0), sem="relaxed")
    m_next = tl.min(tl.where(rel > m + 1, rel, SPAN + 2), 1, keep_dims=True)
    return tl.where(m < SPAN, m_next, m)


@triton.jit
def _scan_chunk(j, c0, n_cols, row_ptr, row_ok, bound, k_len, stride_idx_w, bitmap_rows, base,
                cov_lo, cov_hi, below, above, n_bad, LOG_WB: tl.constexpr, SPAN: tl.constexpr,
                CHUNK: tl.constexpr, BY_BITS: tl.constexpr):
    """OR the words in ``[base, base + SPAN)`` of chunk ``j`` (slots ``c0...``) into the
    scratch bitmap (``bitmap_rows``: ``[BLOCK_M, 1]`` pointers to its rows).
    ``[cov_lo, cov_hi)``: the words this and earlier spans cover; ``below`` / ``above``: the
    largest active word under it and the smallest over it; ``n_bad``: indices outside
    ``[-1, k_len)`` (counted when the chunk has indices outside the span)."""
    j32, active, in_range = _classify(j, bound, k_len)
    rel = (j32 >> LOG_WB) - base
    # the word's place in the span; SPAN + 1: outside it, or out of range; SPAN + 2: inactive
    rel = tl.where(active & (rel >= 0) & (rel < SPAN), rel,
                   tl.where(active | (in_range == 0), SPAN + 1, SPAN + 2))
    bit = tl.full(rel.shape, 1, tl.uint32) << (j32 & ((1 << LOG_WB) - 1)).to(tl.uint32)
    m = _merge_step(rel, bit, tl.min(rel, 1, keep_dims=True), bitmap_rows, SPAN, BY_BITS)
    low = tl.min(tl.min(m, 1), 0)
    while low < SPAN:  # a query has more than two words of the span in this chunk
        m = _merge_step(rel, bit, m, bitmap_rows, SPAN, BY_BITS)
        low = tl.min(tl.min(m, 1), 0)
    if low == SPAN + 1:  # indices outside the span: reload the chunk (rare), locate them
        word, bad = _words(_load_chunk(row_ptr, row_ok, c0, n_cols, stride_idx_w, CHUNK), bound,
                           k_len, LOG_WB)
        below = tl.maximum(below, tl.max(tl.max(tl.where(word < cov_lo, word, -1), 1), 0))
        above = tl.minimum(above, tl.min(tl.min(tl.where(word >= cov_hi, word, BIG), 1), 0))
        n_bad += tl.sum(tl.sum(bad.to(tl.int32), 1), 0)
    return below, above, n_bad


@triton.jit
def _scan_chunks(j, below, above, n_bad, bitmap_rows, row_ptr, row_ok, bound, base, cov_lo,
                 cov_hi, c_begin, c_end, width, k_len, stride_idx_w, LOG_WB: tl.constexpr,
                 SPAN: tl.constexpr, CHUNK: tl.constexpr, BY_BITS: tl.constexpr):
    """``_scan_chunk`` over chunks ``[c_begin, c_end)``, loading one chunk ahead (``j``: chunk
    ``c_begin``, which the caller loaded); returns the updated ``below, above, n_bad``. The
    caller zeroes the bitmap first and reads it after."""
    n_cols = tl.minimum(width, c_end * CHUNK)
    for c in range(c_begin, c_end):
        j_next = _load_chunk(row_ptr, row_ok, (c + 1) * CHUNK, n_cols, stride_idx_w, CHUNK)
        below, above, n_bad = _scan_chunk(j, c * CHUNK, n_cols, row_ptr, row_ok, bound, k_len,
                                          stride_idx_w, bitmap_rows, base, cov_lo, cov_hi,
                                          below, above, n_bad, LOG_WB, SPAN, CHUNK,
                                          BY_BITS)
        j = j_next
    return below, above, n_bad


@triton.jit
def _load_even(row_ptr, c, width, stride_idx_w, CHUNK: tl.constexpr):
    """Chunk ``c`` of the row's queries, or the last one past the end, for a width that
    ``CHUNK`` divides: unmasked (``row_ptr`` points at a real query for every row), so the
    loads are vectorized."""
    cols = tl.minimum(c * CHUNK, width - CHUNK) + tl.arange(0, CHUNK)
    return tl.load(row_ptr[:, None] + cols[None, :].to(tl.int64) * stride_idx_w)


@triton.jit
def _or_into(ptr, value, mask, BY_BITS: tl.constexpr):
    """``atomic_or(ptr, value, mask)`` for per-query values ``[BLOCK_M]`` (a row reduction's
    layout), issued in that layout. ``tl.atomic_or`` first moves pointers, values and masks
    to a layout of its own through shared memory (two barriers each); here each thread issues
    its elements, and a lane whose next-lower lane holds the same pointer (a copy of the same
    query) leaves it to that lane. Under the interpreter: ``tl.atomic_or``."""
    if BY_BITS:
        tl.atomic_or(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.inline_asm_elementwise(
            """{
            .reg .pred ok, up, go;
            .reg .b32 key, prev;
            setp.ne.b32 ok, $3, 0;
            cvt.u32.u64 key, $1;
            selp.b32 key, key, 0xffffffff, ok;
            shfl.sync.up.b32 prev|up, key, 1, 0, 0xffffffff;
            setp.ne.or.b32 go, prev, key, !up;
            and.pred go, go, ok;
            @go red.relaxed.gpu.global.or.b32 [$1], $2;
            mov.b32 $0, 0;
            }""",
            "=r,l,r,r", [ptr, value, mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
            pack=1)


@triton.jit
def _fast_chunk(j, bound, base, bitmap_rows, miss, j_max, out, LOG_WB: tl.constexpr,
                SPAN: tl.constexpr, BY_BITS: tl.constexpr):
    """The fast scan of chunk ``j``: each query's active words here are assumed to be its
    smallest one ``w`` and ``w + 1``, both in the span; their bits are ORed into the scratch
    bitmap (``bitmap_rows``: ``[BLOCK_M]`` pointers to its rows) in one step. Whatever breaks
    that is only recorded, per element (``miss``, uint32: the smallest distance of an active
    word past ``w + 1``, below 2**28 if any; ``j_max``: the largest ``index + 1`` as
    unsigned, above k_len for an index outside ``[-1, k_len)``) or per query (``out``: a
    word outside the span); the caller rescans such a row. Per-query values stay 1-D: a
    ``[BLOCK_M, 1]`` tensor may hold copies of each value in one thread."""
    j32, active, _ = _classify(j, bound, 0)
    word = tl.where(active, j32 >> LOG_WB, BIG)
    w_min = tl.min(word, 1)  # [BLOCK_M]; BIG: no active index
    off = word - (w_min + 2)[:, None]  # -2, -1: the words merged here; inactive: above 2**29
    bit = tl.full(j32.shape, 1, tl.uint32) << (j32 & ((1 << LOG_WB) - 1)).to(tl.uint32)
    lo = _or_rows(tl.where(off == -2, bit, 0), BY_BITS, False)
    hi = _or_rows(tl.where(off == -1, bit, 0), BY_BITS, False)
    miss = tl.minimum(miss, off.to(tl.uint32, bitcast=True))
    j_max = tl.maximum(j_max, (j + 1).to(j_max.dtype, bitcast=True))
    rel = w_min - base
    in_span = (rel >= 0) & (rel + (hi != 0).to(tl.int32) < SPAN)
    _or_into(bitmap_rows + rel, lo, (w_min < BIG) & in_span, BY_BITS)
    _or_into(bitmap_rows + rel + 1, hi, (hi != 0) & in_span, BY_BITS)
    return miss, j_max, out | ((w_min < BIG) & (in_span == 0))


@triton.jit
def _fast_scan(j_a, j_b, row_ptr, bound, base, k_len, width, n_chunks, stride_idx_w, scratch,
               LOG_WB: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
               BY_BITS: tl.constexpr, STAGES: tl.constexpr):
    """The fast scan of a row whose width ``CHUNK`` divides, into the program's scratch
    bitmap: chunks ``j_a`` (the first), ``j_b`` (the last, or the first again) and the others
    (loaded one ahead, two a step so that no chunk is copied between registers; a step past
    the end repeats the last chunk, which changes nothing), each by ``_fast_chunk``. Returns
    whether it held: every query's active words in every chunk at most two consecutive ones
    in the span, no index outside ``[-1, k_len)``. If it did not, the bitmap holds part of
    the row and the caller clears it."""
    bitmap_rows = scratch + tl.arange(0, j_a.shape[0]) * SPAN
    miss = tl.full(j_a.shape, 0xFFFFFFFF, tl.uint32)
    j_max = tl.zeros(j_a.shape, tl.uint64 if j_a.dtype == tl.int64 else tl.uint32)
    out = tl.zeros([j_a.shape[0]], tl.int1)
    miss, j_max, out = _fast_chunk(j_a, bound, base, bitmap_rows, miss, j_max, out, LOG_WB,
                                   SPAN, BY_BITS)
    miss, j_max, out = _fast_chunk(j_b, bound, base, bitmap_rows, miss, j_max, out, LOG_WB,
                                   SPAN, BY_BITS)
    for c in tl.range(1, n_chunks - 1, num_stages=STAGES):
        j = _load_even(row_ptr, c, width, stride_idx_w, CHUNK)
        miss, j_max, out = _fast_chunk(j, bound, base, bitmap_rows, miss, j_max, out, LOG_WB,
                                       SPAN, BY_BITS)
    return ((tl.min(tl.min(miss, 1), 0) >= 2**28)
            & (tl.max(tl.max(j_max, 1), 0) <= tl.cast(k_len, j_max.dtype))
            & (tl.max(out.to(tl.int32), 0) == 0))


@triton.jit
def _window_misses(j, d, c0, k_len, CHUNK: tl.constexpr):
    """Bits where chunk ``j`` (slots ``c0...``) differs from the window of offset ``d``
    (``[BLOCK_M]``, per query): slot s holds key ``d + s`` where that lies in ``[0, k_len)``,
    -1 elsewhere. Nonzero wherever it differs."""
    e = d[:, None] + (c0 + tl.arange(0, CHUNK))[None, :].to(d.dtype)
    if d.dtype == tl.int64:
        inside = (e >= 0) & (e < k_len)
    else:  # one unsigned compare
        inside = e.to(tl.uint32, bitcast=True) < tl.cast(k_len, tl.uint32)
    return j ^ tl.where(inside, e, -1)


@triton.jit
def _window_scan(j_a, j_b, row_ptr, bound, k_len, width, n_chunks, stride_idx_w,
                 LOG_WB: tl.constexpr, LOG_NW: tl.constexpr, SPAN: tl.constexpr,
                 CHUNK: tl.constexpr, STAGES: tl.constexpr):
    """The window scan of a row whose width ``CHUNK`` divides: whether every query's slots hold
    one contiguous ascending run of keys, ``d + s`` in slot ``s`` where that lies in ``[0,
    k_len)`` and -1 elsewhere (``i - W + 1 + arange(W)`` clipped to -1: the usual way to
    write a sliding window), with ``d`` the largest ``index - slot`` of the first and last
    chunks (``j_a``, ``j_b``). Other chunks are read only when those two agree; a chunk costs
    an add, a compare, a select and an OR per index, and no reduction. Returns ``(held, lo,
    hi, base)``: each query's active keys ``[lo, hi]`` (causal bound applied; empty when hi <
    lo) and the tile-aligned first word of a span that holds them all (held is False when
    none does)."""
    cols = tl.arange(0, CHUNK)
    c_b = (n_chunks - 1) * CHUNK
    none = tl.full(j_a.shape, 0, j_a.dtype) - width  # a query with no key: all -1
    d = tl.maximum(tl.max(tl.where(j_a >= 0, j_a - cols[None, :], none), 1),
                   tl.max(tl.where(j_b >= 0, j_b - (c_b + cols)[None, :], none), 1))
    miss = _window_misses(j_a, d, 0, k_len, CHUNK) | _window_misses(j_b, d, c_b, k_len, CHUNK)
    if tl.max(tl.max((miss != 0).to(tl.int32), 1), 0) == 0:  # worth reading the rest
        for c in tl.range(1, n_chunks - 1, num_stages=STAGES):
            j = _load_even(row_ptr, c, width, stride_idx_w, CHUNK)
            miss = miss | _window_misses(j, d, c * CHUNK, k_len, CHUNK)
    held = tl.max(tl.max((miss != 0).to(tl.int32), 1), 0) == 0
    lo = tl.maximum(d, 0)
    hi = tl.minimum(d + (width - 1), (bound - 1).to(d.dtype))  # bound: 0 past q_len
    lo = lo.to(tl.int32)
    hi = hi.to(tl.int32)
    has = hi >= lo
    lo_w = tl.min(tl.where(has, lo >> LOG_WB, BIG), 0)
    hi_w = tl.max(tl.where(has, hi >> LOG_WB, -1), 0)
    base = tl.where(hi_w >= 0, (lo_w >> LOG_NW) << LOG_NW, 0)
    return held & (hi_w < base + SPAN), lo, hi, base


@triton.jit
def _window_bitmap(lo, hi, base, LOG_WB: tl.constexpr, SPAN: tl.constexpr):
    """The span bitmap ``[BLOCK_M, SPAN]`` (uint32) of each query's keys ``[lo, hi]`` from word
    ``base``, built in registers."""
    WB: tl.constexpr = 1 << LOG_WB
    k0 = (base + tl.arange(0, SPAN)) * WB  # each word's first key
    a = tl.minimum(tl.maximum(lo[:, None] - k0[None, :], 0), WB).to(tl.uint64)
    b = tl.minimum(tl.maximum(hi[:, None] + 1 - k0[None, :], 0), WB).to(tl.uint64)
    one = tl.full(a.shape, 1, tl.uint64)
    bits = ((one << b) - (one << a)).to(tl.uint32)
    return tl.where(b > a, bits, 0)


@triton.jit
def _clear_bitmap(scratch, BLOCK_M: tl.constexpr, SPAN: tl.constexpr):
    """Zero the program's bitmap once its atomics are done."""
    offs = tl.arange(0, BLOCK_M)[:, None] * SPAN + tl.arange(0, SPAN)[None, :]
    tl.debug_barrier()
    tl.store(scratch + offs, tl.zeros([BLOCK_M, SPAN], tl.int32), cache_modifier=".cg")
    tl.debug_barrier()


@triton.jit
def _program_bitmap(scratch_ptr, pid, BLOCK_M: tl.constexpr, SPAN: tl.constexpr):
    """Program ``pid``'s scratch bitmap ``[BLOCK_M, SPAN]`` words, zeroed: its base and the
    pointers to its rows ``[BLOCK_M, 1]``."""
    scratch = scratch_ptr + pid.to(tl.int64) * (BLOCK_M * SPAN)
    bitmap_rows = scratch + tl.arange(0, BLOCK_M)[:, None] * SPAN
    tl.store(bitmap_rows + tl.arange(0, SPAN)[None, :],
             tl.zeros([BLOCK_M, SPAN], tl.int32), cache_modifier=".cg")
    return scratch, bitmap_rows


@triton.jit
def _read_bitmap(scratch, BLOCK_M: tl.constexpr, SPAN: tl.constexpr):
    """Wait for the program's atomics, read its bitmap ``[BLOCK_M, SPAN]`` (uint32) past L1,
    and clear it for the next span."""
    offs = tl.arange(0, BLOCK_M)[:, None] * SPAN + tl.arange(0, SPAN)[None, :]
    tl.debug_barrier()
    acc = tl.load(scratch + offs, cache_modifier=".cg").to(tl.uint32, bitcast=True)
    tl.debug_barrier()
    tl.store(scratch + offs, tl.zeros([BLOCK_M, SPAN], tl.int32), cache_modifier=".cg")
    tl.debug_barrier()
    return acc


@triton.jit
def _tile_flags(acc, BLOCK_M: tl.constexpr, SPAN: tl.constexpr, N_WORDS: tl.constexpr,
                FULL_WORD: tl.constexpr):
    """Span bitmap -> (touched, full) int32 flags of its tiles, ``[SPAN // N_WORDS]``. A tile
    is full when every bit is set (queries past q_len and keys past k_len never are)."""
    acc3 = tl.reshape(acc, [BLOCK_M, SPAN // N_WORDS, N_WORDS])
    touched = (tl.max(tl.max(acc3, 2), 0) != 0).to(tl.int32)
    full = (tl.min(tl.min(acc3, 2), 0) == FULL_WORD).to(tl.int32)
    return touched, full


@triton.jit
def _popcount(x):
    """Set bits of each uint32 word."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _store_tiles(acc, touched, full, kt0, full_col_ptr, f0, cap_f, part_col_ptr, masks_ptr, p0,
                 cap_p, keys_full_ptr, key_f, keys_part_ptr, key_p, n_qt, count_f_ptr,
                 count_p_ptr, BLOCK_M: tl.constexpr, SPAN: tl.constexpr, N_WORDS: tl.constexpr,
                 WITH_KEYS: tl.constexpr):
    """Write the span's full tiles at ``full_col[f0:]`` and its partial tiles at
    ``part_col[p0:]`` / ``masks[p0:]``, in key-tile order (the span's first tile is ``kt0``),
    and with ``WITH_KEYS`` their keys (``key_f`` / ``key_p`` + kt * n_qt) at the same
    positions of ``keys_full`` / ``keys_part``, counting them per key tile in ``count_f[kt]``
    / ``count_p[kt]``; nothing at or past the capacities ``cap_f`` / ``cap_p``. Returns the
    advanced ``(f0, p0)``."""
    SPAN_TILES: tl.constexpr = SPAN // N_WORDS
    TILE_WORDS: tl.constexpr = BLOCK_M * N_WORDS
    is_full = touched * full
    is_part = touched - is_full
    f_pos = f0 + tl.cumsum(is_full, 0) - is_full  # [SPAN_TILES]
    p_pos = p0 + tl.cumsum(is_part, 0) - is_part
    put_f = (is_full != 0) & (f_pos >= 0) & (f_pos < cap_f)
    put_p = (is_part != 0) & (p_pos >= 0) & (p_pos < cap_p)
    kt = kt0 + tl.arange(0, SPAN_TILES)
    tl.store(full_col_ptr + f_pos, kt, mask=put_f)
    tl.store(part_col_ptr + p_pos, kt, mask=put_p)
    if WITH_KEYS:
        kt_key = kt.to(tl.int64) * n_qt
        tl.store(keys_full_ptr + f_pos, key_f + kt_key, mask=put_f)
        tl.store(keys_part_ptr + p_pos, key_p + kt_key, mask=put_p)
        tl.atomic_add(count_f_ptr + kt, 1, mask=put_f, sem="relaxed")
        tl.atomic_add(count_p_ptr + kt, 1, mask=put_p, sem="relaxed")
    tiles = tl.permute(tl.reshape(acc, [BLOCK_M, SPAN_TILES, N_WORDS]), (1, 0, 2))
    tiles = tl.reshape(tiles, [SPAN_TILES, TILE_WORDS])  # tile t's words, row-major
    offs = p_pos[:, None].to(tl.int64) * TILE_WORDS + tl.arange(0, TILE_WORDS)[None, :]
    tl.store(masks_ptr + offs, tiles.to(tl.int32, bitcast=True), mask=put_p[:, None])
    return f0 + tl.sum(is_full, 0), p0 + tl.sum(is_part, 0)


@triton.jit
def _row_setup(row, idx_ptr, heads, n_qt, q_len, k_len, causal_offset, stride_idx_b,
               stride_idx_h, stride_idx_q, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Pointers to the row's queries' indices ``[BLOCK_M]`` (the last query's for rows past
    q_len), which queries exist, and one past each query's last allowed key (0 for rows past
    q_len: nothing is active there)."""
    group = row // n_qt
    offs_m = (row % n_qt) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ptr = (idx_ptr + (group // heads).to(tl.int64) * stride_idx_b
               + (group % heads).to(tl.int64) * stride_idx_h
               + tl.minimum(offs_m, q_len - 1).to(tl.int64) * stride_idx_q)
    bound = tl.full([BLOCK_M], k_len, tl.int32)
    if IS_CAUSAL:
        bound = tl.maximum(tl.minimum(bound, offs_m + causal_offset + 1), 0)
    row_ok = offs_m < q_len
    return row_ptr, row_ok, tl.where(row_ok, bound, 0)


@triton.jit
def _first_span(j_a, j_b, row_ptr, row_ok, bound, k_len, width, n_chunks, c_b, stride_idx_w,
                scratch, bitmap_rows, n_bad, n_rescanned, BLOCK_M: tl.constexpr,
                LOG_NW: tl.constexpr, LOG_WB: tl.constexpr, SPAN: tl.constexpr,
                CHUNK: tl.constexpr, BY_BITS: tl.constexpr, FAST: tl.constexpr,
                STAGES: tl.constexpr):
    """Pass 1's first span of a row (chunks ``j_a``, ``j_b``: the first and the last), centred
    on their active words: the fast scan where it holds, else the general one. Returns its
    bitmap ``[BLOCK_M, SPAN]``, its first word, the words covered, the largest active word
    below and the smallest above them, and the updated counts of bad indices and rescanned
    rows."""
    below = tl.full([], -1, tl.int32)
    above = tl.full([], BIG, tl.int32)
    word_a, bad_a = _words(j_a, bound, k_len, LOG_WB)
    word_b, bad_b = _words(j_b, bound, k_len, LOG_WB)
    lo = tl.minimum(tl.min(tl.min(word_a, 1), 0), tl.min(tl.min(word_b, 1), 0))
    hi = tl.maximum(tl.max(tl.max(tl.where(word_a < BIG, word_a, -1), 1), 0),
                    tl.max(tl.max(tl.where(word_b < BIG, word_b, -1), 1), 0))
    base = tl.maximum(tl.minimum(lo, (lo + hi + 1) // 2 - SPAN // 2), 0)
    base = tl.where(lo < BIG, (base >> LOG_NW) << LOG_NW, 0)
    cov_lo = base
    cov_hi = base + SPAN
    tl.debug_barrier()  # the bitmap is zero
    fast = False
    if FAST:
        fast = _fast_scan(j_a, j_b, row_ptr, bound, base, k_len, width, n_chunks,
                          stride_idx_w, scratch, LOG_WB, SPAN, CHUNK, BY_BITS, STAGES)
        if not fast:
            _clear_bitmap(scratch, BLOCK_M, SPAN)
            n_rescanned += 1
    if not fast:
        if FAST:  # the fast scan took them (and its j_b is chunk 0 for a single chunk)
            j_a = _load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK)
            j_b = _load_chunk(row_ptr, row_ok, c_b, width, stride_idx_w, CHUNK)
        j_1 = _load_chunk(row_ptr, row_ok, CHUNK, (n_chunks - 1) * CHUNK, stride_idx_w,
                          CHUNK)
        below, above, n_bad = _scan_chunk(j_a, 0, width, row_ptr, row_ok, bound, k_len,
                                          stride_idx_w, bitmap_rows, base, cov_lo, cov_hi,
                                          below, above, n_bad, LOG_WB, SPAN, CHUNK,
                                          BY_BITS)
        below, above, n_bad = _scan_chunk(j_b, c_b, width, row_ptr, row_ok, bound, k_len,
                                          stride_idx_w, bitmap_rows, base, cov_lo, cov_hi,
                                          below, above, n_bad, LOG_WB, SPAN, CHUNK,
                                          BY_BITS)
        below, above, n_bad = _scan_chunks(j_1, below, above, n_bad, bitmap_rows, row_ptr,
                                           row_ok, bound, base, cov_lo, cov_hi, 1,
                                           n_chunks - 1, width, k_len, stride_idx_w, LOG_WB,
                                           SPAN, CHUNK, BY_BITS)
    acc = _read_bitmap(scratch, BLOCK_M, SPAN)
    return acc, base, cov_lo, cov_hi, below, above, n_bad, n_rescanned


@triton.jit
def indices_to_tiles_count_kernel(
        idx_ptr, counts_ptr, start_ptr, pool_at_ptr, stats_ptr, scratch_ptr,
        pool_full_ptr, pool_part_ptr, pool_mask_ptr, pool_full_cap, pool_part_cap, zero_ptr,
        n_zero, n_rows, heads, n_qt, q_len, k_len, width, causal_offset,
        stride_idx_b, stride_idx_h, stride_idx_q, stride_idx_w,
        BLOCK_M: tl.constexpr, N_WORDS: tl.constexpr, LOG_NW: tl.constexpr, LOG_WB: tl.constexpr,
        FULL_WORD: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
        IS_CAUSAL: tl.constexpr, BY_BITS: tl.constexpr, FAST: tl.constexpr = False,
        WINDOW: tl.constexpr = False, STAGES: tl.constexpr = 3):
    """Pass 1. Persistent grid ``[programs]``, rows ``pid, pid + programs, ...``; indices
    ``(Bl, Hl, Lq, W)``, any strides. Per row: ``counts[0 / 1, row]`` = full / partial tiles,
    ``start[row]`` = the word pass 2 starts at; ``stats`` += (active pairs, out-of-range
    indices, pool slots taken: full, partial, rows the fast scan left to the general one, full
    tiles, partial tiles, rows the window scan held). A row that one span held goes to the pool
    if it fits: ``pool_at[0 / 1, row]`` = its first full / partial slot, else -1. The
    programs also clear ``zero[:n_zero]`` (the later kernels' per-key-tile counters)."""
    SPAN_TILES: tl.constexpr = SPAN // N_WORDS
    pid = tl.program_id(0)
    offs_z = tl.arange(0, 1024)
    for z in range(pid * 1024, n_zero, tl.num_programs(0) * 1024):
        tl.store(zero_ptr + z + offs_z, tl.zeros([1024], tl.int32), mask=z + offs_z < n_zero)
    scratch, bitmap_rows = _program_bitmap(scratch_ptr, pid, BLOCK_M, SPAN)
    tiles_t = tl.arange(0, SPAN_TILES)
    n_chunks = tl.cdiv(width, CHUNK)
    nnz = tl.zeros([], tl.int64)
    n_bad = tl.zeros([], tl.int32)
    n_rescanned = tl.zeros([], tl.int32)
    total_full = tl.zeros([], tl.int64)
    total_part = tl.zeros([], tl.int64)
    n_window = tl.zeros([], tl.int32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        row_ptr, row_ok, bound = _row_setup(row, idx_ptr, heads, n_qt, q_len, k_len,
                                            causal_offset, stride_idx_b, stride_idx_h,
                                            stride_idx_q, BLOCK_M, IS_CAUSAL)
        c_b = tl.maximum(n_chunks - 1, 1) * CHUNK  # nothing there when chunk 0 is the last one
        window = False
        w_lo = tl.zeros([BLOCK_M], tl.int32)
        w_hi = w_lo
        w_base = tl.zeros([], tl.int32)
        if FAST:  # CHUNK divides the width: vectorized loads (no rows past q_len: bound 0)
            j_a = _load_even(row_ptr, 0, width, stride_idx_w, CHUNK)
            j_b = _load_even(row_ptr, n_chunks - 1, width, stride_idx_w, CHUNK)
            if WINDOW:
                window, w_lo, w_hi, w_base = _window_scan(
                    j_a, j_b, row_ptr, bound, k_len, width, n_chunks, stride_idx_w, LOG_WB,
                    LOG_NW, SPAN, CHUNK, STAGES)
        else:
            j_a = _load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK)
            j_b = _load_chunk(row_ptr, row_ok, c_b, width, stride_idx_w, CHUNK)
        below = tl.full([], -1, tl.int32)
        above = tl.full([], BIG, tl.int32)
        cov_lo = tl.zeros([], tl.int32)
        cov_hi = tl.zeros([], tl.int32)
        if window:  # one span holds the row: its bitmap in registers
            base = w_base
            acc = _window_bitmap(w_lo, w_hi, base, LOG_WB, SPAN)
            n_window += 1
        else:
            acc, base, cov_lo, cov_hi, below, above, n_bad, n_rescanned = _first_span(
                j_a, j_b, row_ptr, row_ok, bound, k_len, width, n_chunks, c_b, stride_idx_w,
                scratch, bitmap_rows, n_bad, n_rescanned, BLOCK_M, LOG_NW, LOG_WB, SPAN, CHUNK,
                BY_BITS, FAST, STAGES)
        touched, full = _tile_flags(acc, BLOCK_M, SPAN, N_WORDS, FULL_WORD)
        n_full = tl.sum(touched * full, 0)
        n_part = tl.sum(touched, 0) - n_full
        nnz += tl.sum(tl.sum(_popcount(acc), 1), 0).to(tl.int64)
        first_t = tl.min(tl.where(touched != 0, tiles_t, SPAN_TILES), 0)
        start = tl.where(first_t < SPAN_TILES, base + first_t * N_WORDS, BIG)
        slot_f = tl.full([], -1, tl.int64)
        slot_p = tl.full([], -1, tl.int64)
        if (below < 0) & (above == BIG):  # one span held the row: pool its tiles
            start = base
            slot_f = tl.atomic_add(stats_ptr + 2, n_full.to(tl.int64), sem="relaxed")
            slot_p = tl.atomic_add(stats_ptr + 3, n_part.to(tl.int64), sem="relaxed")
            if (slot_f + n_full <= pool_full_cap) & (slot_p + n_part <= pool_part_cap):
                _store_tiles(acc, touched, full, base >> LOG_NW, pool_full_ptr, slot_f,
                             pool_full_cap, pool_part_ptr, pool_mask_ptr, slot_p, pool_part_cap,
                             pool_full_ptr, 0, pool_full_ptr, 0, 0, pool_full_ptr,
                             pool_full_ptr, BLOCK_M, SPAN, N_WORDS, False)
            else:
                slot_f = tl.full([], -1, tl.int64)
                slot_p = tl.full([], -1, tl.int64)
        tl.store(pool_at_ptr + row, slot_f)
        tl.store(pool_at_ptr + n_rows + row, slot_p)
        # More spans, below or above the words covered so far, until none is left.
        while (below >= 0) | (above < BIG):
            if below >= 0:
                base = (((below + N_WORDS) >> LOG_NW) << LOG_NW) - SPAN  # ends just past `below`
                cov_lo = base
            else:
                base = (above >> LOG_NW) << LOG_NW
                cov_hi = base + SPAN
            below, above, n_bad_span = _scan_chunks(
                _load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK),
                tl.full([], -1, tl.int32), tl.full([], BIG, tl.int32), tl.zeros([], tl.int32),
                bitmap_rows, row_ptr, row_ok, bound, base, cov_lo, cov_hi, 0, n_chunks, width,
                k_len, stride_idx_w, LOG_WB, SPAN, CHUNK, BY_BITS)
            acc = _read_bitmap(scratch, BLOCK_M, SPAN)
            touched, full = _tile_flags(acc, BLOCK_M, SPAN, N_WORDS, FULL_WORD)
            n_full += tl.sum(touched * full, 0)
            n_part += tl.sum(touched * (1 - full), 0)
            nnz += tl.sum(tl.sum(_popcount(acc), 1), 0).to(tl.int64)
            first_t = tl.min(tl.where(touched != 0, tiles_t, SPAN_TILES), 0)
            start = tl.minimum(start, tl.where(first_t < SPAN_TILES, base + first_t * N_WORDS,
                                               BIG))
        tl.store(counts_ptr + row, n_full)
        tl.store(counts_ptr + n_rows + row, n_part)
        tl.store(start_ptr + row, start)
        total_full += n_full
        total_part += n_part
    tl.atomic_add(stats_ptr, nnz, sem="relaxed")
    tl.atomic_add(stats_ptr + 1, n_bad.to(tl.int64), sem="relaxed")
    tl.atomic_add(stats_ptr + 4, n_rescanned.to(tl.int64), sem="relaxed")
    tl.atomic_add(stats_ptr + 5, total_full, sem="relaxed")
    tl.atomic_add(stats_ptr + 6, total_part, sem="relaxed")
    tl.atomic_add(stats_ptr + 7, n_window.to(tl.int64), sem="relaxed")


@triton.jit
def _sum_range(ptr, lo, hi):
    """``ptr[lo:hi].sum()`` of int32 values."""
    offs = tl.arange(0, 1024)
    total = tl.zeros([], tl.int32)
    for i in range(lo, hi, 1024):
        total += tl.sum(tl.load(ptr + i + offs, mask=i + offs < hi, other=0), 0)
    return total


@triton.jit
def indices_to_tiles_write_kernel(
        idx_ptr, counts_ptr, ptrs_ptr, start_ptr, pool_at_ptr, scratch_ptr,
        pool_full_ptr, pool_part_ptr, pool_mask_ptr, full_col_ptr, part_col_ptr, masks_ptr,
        keys_ptr, col_count_ptr, cap_f, cap_p, n_kt,
        n_rows, heads, n_qt, q_len, k_len, width, causal_offset,
        stride_idx_b, stride_idx_h, stride_idx_q, stride_idx_w,
        BLOCK_M: tl.constexpr, N_WORDS: tl.constexpr, LOG_NW: tl.constexpr, LOG_WB: tl.constexpr,
        FULL_WORD: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
        IS_CAUSAL: tl.constexpr, BY_BITS: tl.constexpr):
    """Pass 2, persistent grid ``[programs]`` as pass 1. From pass 1's ``counts`` each program
    sums the rows before its own and writes their CSR pointers ``ptrs[0 / 1, row + 1]`` (full /
    partial; ``ptrs`` zeroed before). The row's full tiles go to ``full_col[ptrs[0, row]:]``,
    its partial ones to ``part_col`` / ``masks`` ``[Tp, BLOCK_M, N_WORDS]`` from ``ptrs[1,
    row]``, sorted by key tile: copied from the pool, or rescanned
    in ascending spans from ``start[row]``. Each tile's ``device.transpose_keys`` value goes to
    ``keys`` (full tiles at their position, partial ones after all full ones) and is counted
    per key tile in ``col_count[0 / 1, group * n_kt + kt]`` (zeroed by pass 1). The outputs
    have room for ``cap_f`` full and ``cap_p`` partial tiles (``keys``: ``cap_f + cap_p``);
    nothing is written past that."""
    SPAN_TILES: tl.constexpr = SPAN // N_WORDS
    TILE_WORDS: tl.constexpr = BLOCK_M * N_WORDS
    pid = tl.program_id(0)
    scratch, bitmap_rows = _program_bitmap(scratch_ptr, pid, BLOCK_M, SPAN)
    t = tl.arange(0, SPAN_TILES)
    e = tl.arange(0, TILE_WORDS)
    n_chunks = tl.cdiv(width, CHUNK)
    n_full = _sum_range(counts_ptr, 0, n_rows)
    pre_f = _sum_range(counts_ptr, 0, pid)  # the tiles of the rows before this program's next
    pre_p = _sum_range(counts_ptr + n_rows, 0, pid)
    keys_part_ptr = keys_ptr + tl.minimum(n_full, cap_f)
    cap_kp = cap_f + cap_p - tl.minimum(n_full, cap_f)  # room for partial keys
    n_cols = (n_rows // n_qt) * n_kt
    for row in range(pid, n_rows, tl.num_programs(0)):
        f0 = pre_f
        p0 = pre_p
        n_f = tl.load(counts_ptr + row)
        n_p = tl.load(counts_ptr + n_rows + row)
        tl.store(ptrs_ptr + row + 1, f0 + n_f)
        tl.store(ptrs_ptr + n_rows + 2 + row, p0 + n_p)
        pre_f += _sum_range(counts_ptr, row, tl.minimum(row + tl.num_programs(0), n_rows))
        pre_p += _sum_range(counts_ptr + n_rows, row,
                            tl.minimum(row + tl.num_programs(0), n_rows))
        slot_f = tl.load(pool_at_ptr + row)
        slot_p = tl.load(pool_at_ptr + n_rows + row)
        key_f = (row // n_qt).to(tl.int64) * n_kt * n_qt + row % n_qt  # + kt * n_qt
        key_p = key_f + tl.cast(n_rows, tl.int64) * n_kt  # partial: after all full tiles
        count_f_ptr = col_count_ptr + (row // n_qt) * n_kt
        count_p_ptr = count_f_ptr + n_cols
        if slot_f >= 0:
            put_f = (t < n_f) & (f0 + t >= 0) & (f0 + t < cap_f)
            put_p = (t < n_p) & (p0 + t >= 0) & (p0 + t < cap_p) & (p0 + t < cap_kp)
            kt_f = tl.load(pool_full_ptr + slot_f + t, mask=put_f)
            kt_p = tl.load(pool_part_ptr + slot_p + t, mask=put_p)
            tl.store(full_col_ptr + f0 + t, kt_f, mask=put_f)
            tl.store(part_col_ptr + p0 + t, kt_p, mask=put_p)
            tl.store(keys_ptr + f0 + t, key_f + kt_f.to(tl.int64) * n_qt, mask=put_f)
            tl.store(keys_part_ptr + p0 + t, key_p + kt_p.to(tl.int64) * n_qt, mask=put_p)
            tl.atomic_add(count_f_ptr + kt_f, 1, mask=put_f, sem="relaxed")
            tl.atomic_add(count_p_ptr + kt_p, 1, mask=put_p, sem="relaxed")
            src = pool_mask_ptr + (slot_p + t)[:, None] * TILE_WORDS + e[None, :]
            words = tl.load(src, mask=put_p[:, None])  # [SPAN_TILES, TILE_WORDS]
            dst = masks_ptr + (p0 + t)[:, None].to(tl.int64) * TILE_WORDS + e[None, :]
            tl.store(dst, words, mask=put_p[:, None])
        elif n_f + n_p > 0:
            row_ptr, row_ok, bound = _row_setup(row, idx_ptr, heads, n_qt, q_len, k_len,
                                                causal_offset, stride_idx_b, stride_idx_h,
                                                stride_idx_q, BLOCK_M, IS_CAUSAL)
            base = tl.load(start_ptr + row)
            tl.debug_barrier()  # the bitmap is zero
            while base < BIG:
                _, above, _ = _scan_chunks(
                    _load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK),
                    tl.full([], -1, tl.int32), tl.full([], BIG, tl.int32),
                    tl.zeros([], tl.int32), bitmap_rows, row_ptr, row_ok, bound, base, base,
                    base + SPAN, 0, n_chunks, width, k_len, stride_idx_w, LOG_WB, SPAN, CHUNK,
                    BY_BITS)
                acc = _read_bitmap(scratch, BLOCK_M, SPAN)
                touched, full = _tile_flags(acc, BLOCK_M, SPAN, N_WORDS, FULL_WORD)
                f0, p0 = _store_tiles(acc, touched, full, base >> LOG_NW, full_col_ptr, f0,
                                      cap_f, part_col_ptr, masks_ptr, p0,
                                      tl.minimum(cap_p, cap_kp), keys_ptr, key_f,
                                      keys_part_ptr, key_p, n_qt, count_f_ptr, count_p_ptr,
                                      BLOCK_M, SPAN, N_WORDS, True)
                base = (above >> LOG_NW) << LOG_NW  # BIG when nothing is left


@triton.jit
def column_pointers_kernel(col_count_ptr, full_ptr_t_ptr, part_ptr_t_ptr, n_cols,
                           BLOCK: tl.constexpr):
    """Grid ``[2]``: program 0 / 1 turns the full / partial tiles counted per key tile
    (``col_count[0 / 1, c]``, pass 2's) into the key-tile pointers ``full_ptr_t`` /
    ``part_ptr_t`` ``[n_cols + 1]``."""
    kind = tl.program_id(0)
    counts = col_count_ptr + kind * n_cols
    out = full_ptr_t_ptr
    if kind == 1:
        out = part_ptr_t_ptr
    offs = tl.arange(0, BLOCK)
    carry = tl.zeros([], tl.int32)
    tl.store(out, carry)
    for c0 in range(0, n_cols, BLOCK):
        x = tl.load(counts + c0 + offs, mask=c0 + offs < n_cols, other=0)
        tl.store(out + c0 + 1 + offs, carry + tl.cumsum(x, 0), mask=c0 + offs < n_cols)
        carry += tl.sum(x, 0)


@triton.jit
def place_tiles_kernel(keys_ptr, ptrs_ptr, full_ptr_t_ptr, part_ptr_t_ptr, col_count_ptr,
                       tmp_full_ptr, tmp_part_ptr, tmp_mask_ptr, n_rows, n_cols, n_qt, cap_f,
                       cap_p, BLOCK: tl.constexpr):
    """Each tile (its ``transpose_keys`` value, from pass 2) to a slot of its key tile's list
    in ``tmp_full`` / ``tmp_part`` (the query tile; for partial tiles ``tmp_mask`` = the tile's
    position among the partial ones, i.e. its mask): the list's start plus a relaxed atomic
    counter (``col_count[2:4, c]``, zeroed by pass 1), so each list comes out in no
    particular order (``rank_tiles_kernel`` sorts it).
    Nothing goes past the capacities ``cap_f`` / ``cap_p``."""
    n_full = tl.minimum(tl.load(ptrs_ptr + n_rows), cap_f)
    n = tl.minimum(n_full + tl.load(ptrs_ptr + 2 * n_rows + 1), cap_f + cap_p)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    key = tl.load(keys_ptr + offs, mask=ok, other=0)
    col2 = (key // n_qt).to(tl.int32)  # kind * n_cols + key tile column
    q_tile = (key % n_qt).to(tl.int32)
    is_part = offs >= n_full
    # a build past its capacities leaves keys unwritten: never follow one out of its list
    ok = ok & tl.where(is_part, (col2 >= n_cols) & (col2 < 2 * n_cols),
                       (col2 >= 0) & (col2 < n_cols))
    col = tl.where(is_part, col2 - n_cols, col2)
    start_f = tl.load(full_ptr_t_ptr + col, mask=ok & (is_part == 0), other=0)
    start_p = tl.load(part_ptr_t_ptr + col, mask=ok & is_part, other=0)
    slot = tl.atomic_add(col_count_ptr + 2 * n_cols + col2, 1, mask=ok, sem="relaxed")
    pos = tl.where(is_part, start_p, start_f) + slot
    tl.store(tmp_full_ptr + pos, q_tile, mask=ok & (is_part == 0) & (pos < cap_f))
    put_p = ok & is_part & (pos < cap_p)
    tl.store(tmp_part_ptr + pos, q_tile, mask=put_p)
    tl.store(tmp_mask_ptr + pos, offs - n_full, mask=put_p)


@triton.jit
def _rank_list(src_ptr, src_mask_ptr, dst_ptr, dst_mask_ptr, lo, hi,
               WITH_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Sort one key tile's list ``src[lo:hi]`` (distinct query tiles) into ``dst[lo:hi]`` by
    rank (how many entries are smaller), its masks along."""
    offs = tl.arange(0, BLOCK)
    for i0 in range(lo, hi, BLOCK):
        ok_i = i0 + offs < hi
        q_i = tl.load(src_ptr + i0 + offs, mask=ok_i, other=0)
        rank = tl.zeros([BLOCK], tl.int32)
        for j0 in range(lo, hi, BLOCK):
            q_j = tl.load(src_ptr + j0 + offs, mask=j0 + offs < hi, other=BIG)
            rank += tl.sum((q_j[None, :] < q_i[:, None]).to(tl.int32), 1)
        tl.store(dst_ptr + lo + rank, q_i, mask=ok_i)
        if WITH_MASK:
            m_i = tl.load(src_mask_ptr + i0 + offs, mask=ok_i)
            tl.store(dst_mask_ptr + lo + rank, m_i, mask=ok_i)


@triton.jit
def rank_tiles_kernel(tmp_full_ptr, tmp_part_ptr, tmp_mask_ptr, ptrs_ptr, full_ptr_t_ptr,
                      part_ptr_t_ptr, row_t_ptr, mask_t_ptr, n_rows, cap_f, cap_p,
                      BLOCK: tl.constexpr):
    """Grid ``[n_cols, 2]``: key tile ``c``'s full (axis 1 = 0) or partial list, sorted by
    query tile, to ``row_t`` (full entries first, then partial ones from ``n_full``) and the
    partial ones' masks to ``mask_t``: what ``device.transpose_tiles`` gives."""
    c = tl.program_id(0)
    if tl.program_id(1) == 0:
        lo = tl.minimum(tl.load(full_ptr_t_ptr + c), cap_f)
        hi = tl.minimum(tl.load(full_ptr_t_ptr + c + 1), cap_f)
        _rank_list(tmp_full_ptr, tmp_full_ptr, row_t_ptr, row_t_ptr, lo, hi, False, BLOCK)
    else:
        n_full = tl.minimum(tl.load(ptrs_ptr + n_rows), cap_f)
        lo = tl.minimum(tl.load(part_ptr_t_ptr + c), cap_p)
        hi = tl.minimum(tl.load(part_ptr_t_ptr + c + 1), cap_p)
        _rank_list(tmp_part_ptr, tmp_mask_ptr, row_t_ptr + n_full, mask_t_ptr, lo, hi, True,
                   BLOCK)


def word_args(block_n: int) -> dict:
    """How a tile row's key bits sit in words: 32 bits a word (16 at ``block_n`` 16),
    ``N_WORDS`` words a tile row, and the value of a word whose keys are all active."""
    bits = min(block_n, 32)
    n_words = block_n // bits
    return dict(N_WORDS=n_words, LOG_NW=n_words.bit_length() - 1, LOG_WB=bits.bit_length() - 1,
                FULL_WORD=(1 << bits) - 1)


def _new_int(shape, dtype, device):
    """``torch.empty`` for integer outputs, filled with a poison value under the tests'
    ``POISON_OUTPUTS`` so that an entry a kernel forgot to write fails the comparison."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(-0x7A5A5A5A) if common.POISON_OUTPUTS else t


class _Plan:
    """What the builds of one problem shape share (``_plan``): sizes, and the kernels bound to
    their scalar arguments."""


class _Counted:
    """Pass 1 launched: its plan and buffers, what the host sync, pass 2 and the transposition
    need."""


_COUNT = Launcher(indices_to_tiles_count_kernel)
_WRITE = Launcher(indices_to_tiles_write_kernel)
_COLUMNS = Launcher(column_pointers_kernel)
_PLACE = Launcher(place_tiles_kernel)
_RANK = Launcher(rank_tiles_kernel)


@functools.lru_cache(maxsize=64)
def _plan(device, shape, strides, dtype, q_len, k_len, is_causal, block_m, block_n, pool_bytes,
          config_items, interpret) -> _Plan:
    """The plan of a build, cached: the build runs every step, and the H200's host spends
    ~0.1 ms working this out (``benchmarks/NOTES.md``, session 7)."""
    p = _Plan()
    n_b, n_h, _, width = shape
    p.n_qt = n_qt = -(-q_len // block_m)
    p.n_kt = n_kt = -(-k_len // block_n)
    p.n_groups = n_b * n_h
    p.n_cols = n_cols = p.n_groups * n_kt
    p.n_rows = n_rows = p.n_groups * n_qt
    p.n_words = n_words = -(-block_n // 32)
    p.key_dtype = transpose_key_dtype(n_rows, n_kt)
    cfg = (dict(config_items) if config_items else
           launch_config.get_tiles_config(block_m, block_n, width, dtype.itemsize))
    span, chunk, per_sm = cfg.pop("SPAN"), cfg.pop("CHUNK"), cfg.pop("programs_per_sm")
    fast, window = cfg.pop("FAST", True), cfg.pop("WINDOW", True)
    stages = cfg.pop("STAGES", 3)
    if cfg.get("maxnreg") is None or device.type != "cuda":
        cfg.pop("maxnreg", None)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        p.n_programs = n_programs = min(n_rows, per_sm * sms)
    else:  # the CPU interpreter runs programs one after the other
        p.n_programs = n_programs = min(n_rows, 3)
    part_cap = min(n_rows * (span // n_words), pool_bytes // (4 * block_m * n_words))
    full_cap = min(n_rows * (span // n_words), pool_bytes // 4) if part_cap else 0
    # pairs, out-of-range indices, pool slots full / partial, rows the fast scan left to the
    # general one, full tiles, partial tiles, rows the window scan held (int64); the pointers
    p.zeroed = [16, 2 * (n_rows + 1)]
    # counts, start, pool_at, scratch, pool full / partial / masks, per key tile: full and
    # partial tiles (pass 2's counts), then the place kernel's counters
    p.work = [2 * n_rows, n_rows, 2 * n_rows, n_programs * block_m * span, max(full_cap, 1),
              max(part_cap, 1), max(part_cap, 1) * block_m * n_words, 4 * n_cols]
    shared = dict(n_rows=n_rows, heads=n_h, n_qt=n_qt, q_len=q_len, k_len=k_len, width=width,
                  causal_offset=k_len - q_len, stride_idx_b=strides[0], stride_idx_h=strides[1],
                  stride_idx_q=strides[2], stride_idx_w=strides[3], BLOCK_M=block_m,
                  **word_args(block_n), SPAN=span, CHUNK=chunk, IS_CAUSAL=is_causal,
                  BY_BITS=interpret, **cfg)
    fast = fast and width > 0 and width % chunk == 0
    p.count = _COUNT.bind(pool_full_cap=full_cap, pool_part_cap=part_cap, n_zero=4 * n_cols,
                          FAST=fast, WINDOW=fast and window, STAGES=stages, **shared)
    p.write = _WRITE.bind(n_kt=n_kt, **shared)
    p.columns = _COLUMNS.bind(n_cols=n_cols, BLOCK=1024)
    p.place = _PLACE.bind(n_rows=n_rows, n_cols=n_cols, n_qt=max(n_qt, 1), BLOCK=1024)
    p.rank = _RANK.bind(n_rows=n_rows, BLOCK=32)
    return p


def _count_pass(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config):
    """Launch pass 1; no sync (``_read_stats`` is the sync). Two allocations: a zeroed one for
    the statistics and the CSR pointers (which the layout keeps), and one int32 workspace for
    the per-row arrays, the programs' scratch, the pool and the per-key-tile counters."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {idx.dtype}")
    if k_len >= 2**31 - 2**15:
        raise ValueError(f"k_len={k_len} is too large for the Triton layout build")
    c = _Counted()
    c.device = idx.device
    c.plan = p = _plan(idx.device, tuple(idx.shape), idx.stride(), idx.dtype, q_len, k_len,
                       bool(is_causal), block_m, block_n, pool_bytes,
                       tuple(config.items()) if config else None,
                       os.environ.get("TRITON_INTERPRET") == "1")
    stats, c.ptrs = torch.zeros(sum(p.zeroed), dtype=torch.int32,
                                device=c.device).split(p.zeroed)
    c.stats = stats.view(torch.int64)
    (c.counts, c.start, c.pool_at, c.scratch, c.pool_full, c.pool_part, c.pool_mask,
     c.columns) = _new_int(sum(p.work), torch.int32, c.device).split(p.work)  # freed after
    if p.n_rows:
        p.count((p.n_programs,), idx_ptr=idx, counts_ptr=c.counts, start_ptr=c.start,
                pool_at_ptr=c.pool_at, stats_ptr=c.stats, scratch_ptr=c.scratch,
                pool_full_ptr=c.pool_full, pool_part_ptr=c.pool_part,
                pool_mask_ptr=c.pool_mask, zero_ptr=c.columns)
    else:  # no pass 1 to clear the counters
        c.columns.zero_()
    return c


def _read_stats(c, idx, k_len):
    """The host sync: pass 1's totals (``c.nnz``, ``c.n_full``, ``c.n_part``); raises for
    out-of-range indices and for layouts too large for int32 positions."""
    c.nnz, n_bad, _, _, rescanned, c.n_full, c.n_part, window = c.stats.tolist()
    LAST_BUILD.update(rows=c.plan.n_rows, rescanned_rows=rescanned, window_rows=window)
    if n_bad:
        from .device import index_range_error
        raise index_range_error(idx, k_len)
    if max(c.n_full, c.n_part) >= 2**31:
        raise ValueError("layout has more than 2**31 tiles; use larger block_m / block_n")


def _write_pass(idx, c, full_col, part_col, masks, keys):
    """Launch pass 2 into the given outputs (their lengths: the capacities)."""
    p = c.plan
    if p.n_rows:
        p.write((p.n_programs,), idx_ptr=idx, counts_ptr=c.counts, ptrs_ptr=c.ptrs,
                start_ptr=c.start, pool_at_ptr=c.pool_at, scratch_ptr=c.scratch,
                pool_full_ptr=c.pool_full, pool_part_ptr=c.pool_part,
                pool_mask_ptr=c.pool_mask, full_col_ptr=full_col, part_col_ptr=part_col,
                masks_ptr=masks, keys_ptr=keys, col_count_ptr=c.columns,
                cap_f=full_col.numel(), cap_p=part_col.numel())


def _transpose(c, keys, cap_f, cap_p, full_ptr_t, part_ptr_t, tmp_full, tmp_part, tmp_mask,
               row_t, part_mask_t):
    """The key-tile lists (``device.transpose_tiles``) from pass 2's keys and per-key-tile
    counts: their pointers, each tile placed in its list, each list sorted."""
    p = c.plan
    p.columns((2,), col_count_ptr=c.columns, full_ptr_t_ptr=full_ptr_t,
              part_ptr_t_ptr=part_ptr_t)
    if not p.n_cols:
        return
    p.place((max(triton.cdiv(cap_f + cap_p, 1024), 1),), keys_ptr=keys, ptrs_ptr=c.ptrs,
            full_ptr_t_ptr=full_ptr_t, part_ptr_t_ptr=part_ptr_t, col_count_ptr=c.columns,
            tmp_full_ptr=tmp_full, tmp_part_ptr=tmp_part, tmp_mask_ptr=tmp_mask, cap_f=cap_f,
            cap_p=cap_p)
    p.rank((p.n_cols, 2), tmp_full_ptr=tmp_full, tmp_part_ptr=tmp_part, tmp_mask_ptr=tmp_mask,
           ptrs_ptr=c.ptrs, full_ptr_t_ptr=full_ptr_t, part_ptr_t_ptr=part_ptr_t,
           row_t_ptr=row_t, mask_t_ptr=part_mask_t, cap_f=cap_f, cap_p=cap_p)


def indices_to_tiles_triton(idx: torch.Tensor, q_len: int, k_len: int, is_causal: bool,
                            block_m: int, block_n: int, *, pool_bytes: int = POOL_BYTES,
                            config: dict | None = None, with_keys: bool = False):
    """``(Bl, Hl, Lq, W)`` int32/int64 indices (any strides) -> ``full_ptr, full_col, part_ptr,
    part_col, masks, nnz`` exactly as ``indices_to_tiles_torch`` gives them (pointers int64,
    columns and masks int32, ``nnz`` an int), on ``idx.device``.

    Raises ``ValueError`` for an index outside ``[-1, k_len)``: the kernels count them, so the
    caller need not scan the indices first. ``config`` overrides
    ``kernels.config.get_tiles_config``; ``pool_bytes`` caps the pool of single-span rows
    (0: pass 2 rescans every row). ``with_keys``: return ``(arrays, keys)``, ``keys`` the
    tiles' ``device.transpose_keys``, which pass 2 writes next to the tiles.
    """
    c = _count_pass(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config)
    _read_stats(c, idx, k_len)
    full_col = _new_int(c.n_full, torch.int32, c.device)
    part_col = _new_int(c.n_part, torch.int32, c.device)
    masks = _new_int((c.n_part, block_m, c.plan.n_words), torch.int32, c.device)
    keys = _new_int(c.n_full + c.n_part, c.plan.key_dtype, c.device)
    _write_pass(idx, c, full_col, part_col, masks, keys)
    ptrs = c.ptrs.long().view(2, -1)
    arrays = ptrs[0], full_col, ptrs[1], part_col, masks, c.nnz
    return (arrays, keys) if with_keys else arrays


# Tile counts to allocate for the next build of the same shape: (device, shape, dtype, q_len,
# k_len, is_causal, block_m, block_n) -> (full, partial), the last build's plus 1/16.
_CAPACITY = collections.OrderedDict()
CAPACITY_ENTRIES = 64


def forget_capacities():
    """Drop the remembered tile counts: the next build of every shape syncs after pass 1."""
    _CAPACITY.clear()


def layout_tensors_triton(idx: torch.Tensor, q_len: int, k_len: int, is_causal: bool,
                          block_m: int, block_n: int, *, pool_bytes: int = POOL_BYTES,
                          config: dict | None = None,
                          reuse_capacity: bool = True) -> tuple[dict, int]:
    """Every tensor of the ``SparseLayout`` of ``idx`` (int32, on its device) and ``nnz``:
    ``indices_to_tiles_triton``'s tiles with the key-tile lists of ``device.transpose_tiles``
    (``_transpose``: three small kernels, no sort).

    The first build of a shape syncs after pass 1 for the tile counts and allocates exactly.
    Later builds of the same shape (``reuse_capacity``) allocate the last build's counts plus
    1/16 and launch everything without waiting; the one sync comes last (pass 1's totals and
    its index check) and the tensors are views of their first entries. A build that needs
    more room is redone the first way (twice the work, once); one that used less than half is
    copied to tensors of its own size.
    """
    key = (idx.device, tuple(idx.shape), idx.dtype, q_len, k_len, is_causal, block_m, block_n)
    cap = _CAPACITY.get(key) if reuse_capacity else None
    args = (idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config)
    built = _build(*args, cap)
    if built is None:  # more tiles than the capacity
        cap = None
        built = _build(*args, cap)
    tensors, nnz, n_full, n_part, cap_n = built
    if 2 * (n_full + n_part) < cap_n:  # mostly unused: give the tensors their own storage
        tensors = {name: t.clone() for name, t in tensors.items()}
    if reuse_capacity:
        if cap is None or 2 * (n_full + n_part) < cap_n:
            _CAPACITY[key] = (n_full + n_full // 16 + 16, n_part + n_part // 16 + 16)
        _CAPACITY.move_to_end(key)
        while len(_CAPACITY) > CAPACITY_ENTRIES:
            _CAPACITY.popitem(last=False)
    return tensors, nnz


def _build(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config, cap):
    """``layout_tensors_triton`` with room for ``cap`` = (full, partial) tiles, or exactly as
    many as pass 1 counts (``None``: a sync after it). Returns ``(tensors, nnz, n_full,
    n_part, capacity)``, or None when the layout does not fit ``cap``. The outputs are views of
    one int32 allocation, in this order."""
    c = _count_pass(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config)
    p = c.plan
    exact = cap is None
    if exact:
        _read_stats(c, idx, k_len)
        cap = c.n_full, c.n_part
    cap_f, cap_p = cap
    cap_n = cap_f + cap_p
    tile_words = block_m * p.n_words
    sizes = [cap_f, cap_p, cap_p * tile_words, cap_n, cap_p, p.n_cols + 1, p.n_cols + 1]
    buffer = _new_int(sum(sizes), torch.int32, c.device)
    full_col, part_col, masks, row_t, part_mask_t, full_ptr_t, part_ptr_t = buffer.split(sizes)
    # not in the layout's buffer (freed after): the tiles' keys, the unsorted key-tile lists
    keys = _new_int(cap_n, p.key_dtype, c.device)
    tmp_full, tmp_part, tmp_mask = _new_int(cap_n + cap_p, torch.int32, c.device).split(
        [cap_f, cap_p, cap_p])
    _write_pass(idx, c, full_col, part_col, masks, keys)
    _transpose(c, keys, cap_f, cap_p, full_ptr_t, part_ptr_t, tmp_full, tmp_part, tmp_mask,
               row_t, part_mask_t)
    if not exact:
        _read_stats(c, idx, k_len)  # the one sync, after every launch
        if c.n_full > cap_f or c.n_part > cap_p:
            return None
    n_full, n_part = c.n_full, c.n_part
    full_ptr, part_ptr = c.ptrs.split(p.n_rows + 1)
    tensors = dict(full_ptr=full_ptr, part_ptr=part_ptr, full_col=full_col[:n_full],
                   part_col=part_col[:n_part],
                   masks=masks[:n_part * tile_words].view(n_part, block_m, p.n_words),
                   full_row_t=row_t[:n_full], part_row_t=row_t[n_full:n_full + n_part],
                   part_mask_t=part_mask_t[:n_part], full_ptr_t=full_ptr_t,
                   part_ptr_t=part_ptr_t)
    return tensors, c.nnz, n_full, n_part, cap_n
