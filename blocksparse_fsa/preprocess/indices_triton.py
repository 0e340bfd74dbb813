"""Per-query key indices -> tile metadata in Triton, on the indices' GPU.

The same layout as the numba path (``indices.py``) and the PyTorch path (``device.py``), tensor
for tensor, from three kernels and a sort, with one host sync after the first kernel. A *row*
is one (layout batch, layout head, query tile) with ``block_m`` queries of ``width`` index
slots each; persistent programs take rows in turn. A program reads its row's indices in
``[block_m, CHUNK]`` chunks and ORs their bits into a bitmap of ``[block_m, SPAN]`` 32-bit key
words starting at a tile-aligned word ``base`` (a *span*), kept in the program's own scratch
in global memory (L2).
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
  the general way.
* ``indices_to_tiles_write_kernel``: after a cumsum of the counts and the host's one sync,
  copies pooled rows to their CSR offsets and rescans the others in ascending spans from
  their first word, writing each tile's sort key for the transposed lists.
* ``transposed_lists_kernel``: after one sort of those keys, the key-tile lists.

Memory: O(rows) counters, the programs' scratch (programs x block_m x SPAN words) and the pool
(at most ``POOL_BYTES``): nothing of size Lq x Lk or (query tiles x key tiles).
"""

import os

import torch
import triton
import triton.language as tl

from ..kernels import common
from ..kernels import config as launch_config
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
def _store_tiles(acc, touched, full, kt0, full_col_ptr, f0, part_col_ptr, masks_ptr, p0,
                 keys_full_ptr, key_f, keys_part_ptr, key_p, n_qt,
                 BLOCK_M: tl.constexpr, SPAN: tl.constexpr, N_WORDS: tl.constexpr,
                 WITH_KEYS: tl.constexpr):
    """Write the span's full tiles at ``full_col[f0:]`` and its partial tiles at
    ``part_col[p0:]`` / ``masks[p0:]``, in key-tile order (the span's first tile is ``kt0``),
    and with ``WITH_KEYS`` their sort keys (``key_f`` / ``key_p`` + kt * n_qt) at the same
    positions of ``keys_full`` / ``keys_part``. Returns the advanced ``(f0, p0)``."""
    SPAN_TILES: tl.constexpr = SPAN // N_WORDS
    TILE_WORDS: tl.constexpr = BLOCK_M * N_WORDS
    is_full = touched * full
    is_part = touched - is_full
    f_pos = f0 + tl.cumsum(is_full, 0) - is_full  # [SPAN_TILES]
    p_pos = p0 + tl.cumsum(is_part, 0) - is_part
    kt = kt0 + tl.arange(0, SPAN_TILES)
    tl.store(full_col_ptr + f_pos, kt, mask=is_full != 0)
    tl.store(part_col_ptr + p_pos, kt, mask=is_part != 0)
    if WITH_KEYS:
        kt_key = kt.to(tl.int64) * n_qt
        tl.store(keys_full_ptr + f_pos, key_f + kt_key, mask=is_full != 0)
        tl.store(keys_part_ptr + p_pos, key_p + kt_key, mask=is_part != 0)
    tiles = tl.permute(tl.reshape(acc, [BLOCK_M, SPAN_TILES, N_WORDS]), (1, 0, 2))
    tiles = tl.reshape(tiles, [SPAN_TILES, TILE_WORDS])  # tile t's words, row-major
    offs = p_pos[:, None].to(tl.int64) * TILE_WORDS + tl.arange(0, TILE_WORDS)[None, :]
    tl.store(masks_ptr + offs, tiles.to(tl.int32, bitcast=True), mask=(is_part != 0)[:, None])
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
def indices_to_tiles_count_kernel(
        idx_ptr, counts_ptr, ptrs_ptr, start_ptr, pool_at_ptr, stats_ptr, scratch_ptr,
        pool_full_ptr, pool_part_ptr, pool_mask_ptr, pool_full_cap, pool_part_cap,
        n_rows, heads, n_qt, q_len, k_len, width, causal_offset,
        stride_idx_b, stride_idx_h, stride_idx_q, stride_idx_w,
        BLOCK_M: tl.constexpr, N_WORDS: tl.constexpr, LOG_NW: tl.constexpr, LOG_WB: tl.constexpr,
        FULL_WORD: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
        IS_CAUSAL: tl.constexpr, BY_BITS: tl.constexpr, FAST: tl.constexpr = False,
        STAGES: tl.constexpr = 3):
    """Pass 1. Persistent grid ``[programs]``, rows ``pid, pid + programs, ...``; indices
    ``(Bl, Hl, Lq, W)``, any strides. Per row: ``counts[0 / 1, row]`` = full / partial tiles,
    ``start[row]`` = the word pass 2 starts at; ``stats`` += (active pairs, out-of-range
    indices, pool slots taken: full, partial, rows the fast scan left to the general one, full
    tiles, partial tiles); ``ptrs[0 / 1, 0]`` = 0. A row that one span held goes to the pool if
    it fits: ``pool_at[0 / 1, row]`` = its first full / partial slot, else -1."""
    SPAN_TILES: tl.constexpr = SPAN // N_WORDS
    pid = tl.program_id(0)
    scratch, bitmap_rows = _program_bitmap(scratch_ptr, pid, BLOCK_M, SPAN)
    tiles_t = tl.arange(0, SPAN_TILES)
    n_chunks = tl.cdiv(width, CHUNK)
    nnz = tl.zeros([], tl.int64)
    n_bad = tl.zeros([], tl.int32)
    n_rescanned = tl.zeros([], tl.int32)
    total_full = tl.zeros([], tl.int64)
    total_part = tl.zeros([], tl.int64)
    for row in range(pid, n_rows, tl.num_programs(0)):
        row_ptr, row_ok, bound = _row_setup(row, idx_ptr, heads, n_qt, q_len, k_len,
                                            causal_offset, stride_idx_b, stride_idx_h,
                                            stride_idx_q, BLOCK_M, IS_CAUSAL)
        # First span: centred on the active words of the first and last chunks.
        c_b = tl.maximum(n_chunks - 1, 1) * CHUNK  # nothing there when chunk 0 is the last one
        if FAST:  # CHUNK divides the width: vectorized loads (no rows past q_len: bound 0)
            j_a = _load_even(row_ptr, 0, width, stride_idx_w, CHUNK)
            j_b = _load_even(row_ptr, n_chunks - 1, width, stride_idx_w, CHUNK)
        else:
            j_a = _load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK)
            j_b = _load_chunk(row_ptr, row_ok, c_b, width, stride_idx_w, CHUNK)
        word_a, bad_a = _words(j_a, bound, k_len, LOG_WB)
        word_b, bad_b = _words(j_b, bound, k_len, LOG_WB)
        lo = tl.minimum(tl.min(tl.min(word_a, 1), 0), tl.min(tl.min(word_b, 1), 0))
        hi = tl.maximum(tl.max(tl.max(tl.where(word_a < BIG, word_a, -1), 1), 0),
                        tl.max(tl.max(tl.where(word_b < BIG, word_b, -1), 1), 0))
        base = tl.maximum(tl.minimum(lo, (lo + hi + 1) // 2 - SPAN // 2), 0)
        base = tl.where(lo < BIG, (base >> LOG_NW) << LOG_NW, 0)
        cov_lo = base
        cov_hi = base + SPAN
        below = tl.full([], -1, tl.int32)
        above = tl.full([], BIG, tl.int32)
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
                             pool_part_ptr, pool_mask_ptr, slot_p, pool_full_ptr, 0,
                             pool_full_ptr, 0, 0, BLOCK_M, SPAN, N_WORDS, False)
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
    if pid == 0:  # the pointers' first entries (a cumsum of the counts writes the rest)
        tl.store(ptrs_ptr, 0)
        tl.store(ptrs_ptr + n_rows + 1, 0)


@triton.jit
def indices_to_tiles_write_kernel(
        idx_ptr, full_ptr_ptr, part_ptr_ptr, start_ptr, pool_at_ptr, scratch_ptr,
        pool_full_ptr, pool_part_ptr, pool_mask_ptr, full_col_ptr, part_col_ptr, masks_ptr,
        keys_full_ptr, keys_part_ptr, n_kt,
        n_rows, heads, n_qt, q_len, k_len, width, causal_offset,
        stride_idx_b, stride_idx_h, stride_idx_q, stride_idx_w,
        BLOCK_M: tl.constexpr, N_WORDS: tl.constexpr, LOG_NW: tl.constexpr, LOG_WB: tl.constexpr,
        FULL_WORD: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
        IS_CAUSAL: tl.constexpr, BY_BITS: tl.constexpr):
    """Pass 2, persistent grid ``[programs]`` as pass 1: the row's full tiles go to
    ``full_col[full_ptr[row]:]``, its partial ones to ``part_col`` / ``masks`` ``[Tp, BLOCK_M,
    N_WORDS]`` from ``part_ptr[row]``, sorted by key tile: copied from the pool, or rescanned
    in ascending spans from ``start[row]``. Each tile's sort key for the transposed lists
    (``device.transpose_keys``) goes to ``keys_full`` / ``keys_part`` at the tile's position."""
    SPAN_TILES: tl.constexpr = SPAN // N_WORDS
    TILE_WORDS: tl.constexpr = BLOCK_M * N_WORDS
    pid = tl.program_id(0)
    scratch, bitmap_rows = _program_bitmap(scratch_ptr, pid, BLOCK_M, SPAN)
    t = tl.arange(0, SPAN_TILES)
    e = tl.arange(0, TILE_WORDS)
    n_chunks = tl.cdiv(width, CHUNK)
    for row in range(pid, n_rows, tl.num_programs(0)):
        f0 = tl.load(full_ptr_ptr + row)
        n_f = tl.load(full_ptr_ptr + row + 1) - f0
        p0 = tl.load(part_ptr_ptr + row)
        n_p = tl.load(part_ptr_ptr + row + 1) - p0
        slot_f = tl.load(pool_at_ptr + row)
        slot_p = tl.load(pool_at_ptr + n_rows + row)
        key_f = (row // n_qt).to(tl.int64) * n_kt * n_qt + row % n_qt  # + kt * n_qt
        key_p = key_f + tl.cast(n_rows, tl.int64) * n_kt  # partial: after all full tiles
        if slot_f >= 0:
            kt_f = tl.load(pool_full_ptr + slot_f + t, mask=t < n_f)
            kt_p = tl.load(pool_part_ptr + slot_p + t, mask=t < n_p)
            tl.store(full_col_ptr + f0 + t, kt_f, mask=t < n_f)
            tl.store(part_col_ptr + p0 + t, kt_p, mask=t < n_p)
            tl.store(keys_full_ptr + f0 + t, key_f + kt_f.to(tl.int64) * n_qt, mask=t < n_f)
            tl.store(keys_part_ptr + p0 + t, key_p + kt_p.to(tl.int64) * n_qt, mask=t < n_p)
            src = pool_mask_ptr + (slot_p + t)[:, None] * TILE_WORDS + e[None, :]
            words = tl.load(src, mask=(t < n_p)[:, None])  # [SPAN_TILES, TILE_WORDS]
            dst = masks_ptr + (p0 + t)[:, None] * TILE_WORDS + e[None, :]
            tl.store(dst, words, mask=(t < n_p)[:, None])
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
                                      part_col_ptr, masks_ptr, p0, keys_full_ptr, key_f,
                                      keys_part_ptr, key_p, n_qt, BLOCK_M, SPAN, N_WORDS, True)
                base = (above >> LOG_NW) << LOG_NW  # BIG when nothing is left


@triton.jit
def transposed_lists_kernel(values_ptr, order_ptr, row_t_ptr, mask_t_ptr, full_ptr_t_ptr,
                            part_ptr_t_ptr, n, n_full, n_cols, n_qt, steps,
                            BLOCK: tl.constexpr):
    """The key-tile lists from the sorted ``transpose_keys`` (``values``, ascending, and the
    sort's ``order``), what ``device.transpose_tiles`` computes, in one launch: ``row_t[i]``
    = the i-th entry's query tile, ``mask_t[i]`` = ``order[n_full + i] - n_full`` (a partial
    entry's mask), and the pointers ``full_ptr_t[c]`` / ``part_ptr_t[c]`` over the
    ``n_cols + 1`` column bounds (a binary search of ``steps`` steps for each ``c * n_qt``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_n = offs < n
    values = tl.load(values_ptr + offs, mask=in_n, other=0)
    tl.store(row_t_ptr + offs, (values % n_qt).to(tl.int32), mask=in_n)
    in_p = offs < n - n_full
    order = tl.load(order_ptr + n_full + offs, mask=in_p, other=0)
    tl.store(mask_t_ptr + offs, (order - n_full).to(tl.int32), mask=in_p)
    target = offs.to(values.dtype) * n_qt  # bound c = offs of the 2 * n_cols + 1
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.full([BLOCK], 0, tl.int32) + n
    for _ in range(steps):  # the first entry >= target
        searching = lo < hi
        mid = (lo + hi) // 2
        below = searching & (tl.load(values_ptr + mid, mask=searching, other=0) < target)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(searching & (below == 0), mid, hi)
    tl.store(full_ptr_t_ptr + offs, lo, mask=offs <= n_cols)
    tl.store(part_ptr_t_ptr + offs - n_cols, lo - n_full,
             mask=(offs >= n_cols) & (offs <= 2 * n_cols))


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


def _int32_views(sizes: dict, device) -> dict:
    """One int32 allocation (``_new_int``) split into 1-D views of the given sizes, by name."""
    buffer = _new_int(sum(sizes.values()), torch.int32, device)
    return dict(zip(sizes, buffer.split(list(sizes.values()))))


class _Counted:
    """Pass 1 launched (and synced): what pass 2 and the transposition need."""


def _count_pass(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config):
    """Launch pass 1 (and the cumsum of its counts), read its totals (the one host sync) and
    raise for out-of-range indices. Few launches and allocations: one int32 workspace holds
    the per-row arrays, the programs' scratch and the pool; the pointers have their own."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {idx.dtype}")
    if k_len >= 2**31 - 2**15:
        raise ValueError(f"k_len={k_len} is too large for the Triton layout build")
    c = _Counted()
    device = c.device = idx.device
    n_b, n_h, _, width = idx.shape
    c.n_qt = n_qt = -(-q_len // block_m)
    c.n_kt = -(-k_len // block_n)
    c.n_groups = n_b * n_h
    c.n_rows = n_rows = n_b * n_h * n_qt
    c.n_words = n_words = -(-block_n // 32)
    cfg = dict(config or launch_config.get_tiles_config(block_m, block_n, width,
                                                         idx.element_size()))
    span, chunk, per_sm = cfg.pop("SPAN"), cfg.pop("CHUNK"), cfg.pop("programs_per_sm")
    fast, stages = cfg.pop("FAST", True), cfg.pop("STAGES", 3)
    if cfg.get("maxnreg") is None or device.type != "cuda":
        cfg.pop("maxnreg", None)
    if device.type == "cuda":
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        n_programs = min(n_rows, per_sm * n_sm)
    else:  # the CPU interpreter runs programs one after the other
        n_programs = min(n_rows, 3)
    c.n_programs = n_programs
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    part_cap = min(n_rows * (span // n_words), pool_bytes // (4 * block_m * n_words))
    full_cap = min(n_rows * (span // n_words), pool_bytes // 4) if part_cap else 0
    sizes = dict(counts=2 * n_rows, start=n_rows, pool_at=2 * n_rows,
                 scratch=n_programs * block_m * span, pool_full=max(full_cap, 1),
                 pool_part=max(part_cap, 1), pool_mask=max(part_cap, 1) * block_m * n_words)
    views = _int32_views(sizes, device)  # freed after the build
    c.ptrs = _new_int((2, n_rows + 1), torch.int32, device)  # the layout keeps these
    counts = views["counts"].view(2, n_rows)
    c.start, c.pool_at = views["start"], views["pool_at"]
    c.scratch, c.pool_full = views["scratch"], views["pool_full"]
    c.pool_part, c.pool_mask = views["pool_part"], views["pool_mask"]
    # pairs, out-of-range indices, pool slots full / partial, rows the fast scan left to the
    # general one, full tiles, partial tiles
    stats = torch.zeros(7, dtype=torch.int64, device=device)
    c.args = dict(n_rows=n_rows, heads=n_h, n_qt=n_qt, q_len=q_len, k_len=k_len, width=width,
                  causal_offset=k_len - q_len, stride_idx_b=idx.stride(0),
                  stride_idx_h=idx.stride(1), stride_idx_q=idx.stride(2),
                  stride_idx_w=idx.stride(3), BLOCK_M=block_m, **word_args(block_n),
                  SPAN=span, CHUNK=chunk, IS_CAUSAL=bool(is_causal), BY_BITS=interpret, **cfg)
    if n_rows:
        indices_to_tiles_count_kernel[(n_programs,)](
            idx, counts, c.ptrs, c.start, c.pool_at, stats, c.scratch, c.pool_full,
            c.pool_part, c.pool_mask, pool_full_cap=full_cap, pool_part_cap=part_cap,
            FAST=fast and width > 0 and width % chunk == 0, STAGES=stages, **c.args)
        torch.cumsum(counts, 1, out=c.ptrs[:, 1:])  # int32: the totals are checked below
    else:
        c.ptrs.zero_()
    c.nnz, n_bad, _, _, rescanned, c.n_full, c.n_part = stats.tolist()  # the one sync
    LAST_BUILD.update(rows=n_rows, rescanned_rows=rescanned)
    if n_bad:
        from .device import index_range_error
        raise index_range_error(idx, k_len)
    if max(c.n_full, c.n_part) >= 2**31:
        raise ValueError("layout has more than 2**31 tiles; use larger block_m / block_n")
    c.key_dtype = transpose_key_dtype(n_rows, c.n_kt)
    return c


def _write_pass(idx, c, full_col, part_col, masks, keys):
    """Launch pass 2 into the given outputs."""
    if c.n_rows:
        indices_to_tiles_write_kernel[(c.n_programs,)](
            idx, c.ptrs[0], c.ptrs[1], c.start, c.pool_at, c.scratch, c.pool_full, c.pool_part,
            c.pool_mask, full_col, part_col, masks, keys, keys[c.n_full:], c.n_kt, **c.args)


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
    full_col = _new_int(c.n_full, torch.int32, c.device)
    part_col = _new_int(c.n_part, torch.int32, c.device)
    masks = _new_int((c.n_part, block_m, c.n_words), torch.int32, c.device)
    keys = _new_int(c.n_full + c.n_part, c.key_dtype, c.device)
    _write_pass(idx, c, full_col, part_col, masks, keys)
    ptrs = c.ptrs.long()
    arrays = ptrs[0], full_col, ptrs[1], part_col, masks, c.nnz
    return (arrays, keys) if with_keys else arrays


def layout_tensors_triton(idx: torch.Tensor, q_len: int, k_len: int, is_causal: bool,
                          block_m: int, block_n: int, *, pool_bytes: int = POOL_BYTES,
                          config: dict | None = None) -> tuple[dict, int]:
    """Every tensor of the ``SparseLayout`` of ``idx`` (int32, on its device) and ``nnz``:
    ``indices_to_tiles_triton``'s tiles with the key-tile lists of ``device.transpose_tiles``
    (one sort of the tiles' keys and ``transposed_lists_kernel``). After pass 1's sync: one
    allocation for the layout (views of one int32 buffer) and one for the keys, pass 2, the
    sort and one more launch."""
    c = _count_pass(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config)
    n = c.n_full + c.n_part
    n_cols = c.n_groups * c.n_kt
    sizes = dict(full_col=c.n_full, part_col=c.n_part, masks=c.n_part * block_m * c.n_words,
                 row_t=n, part_mask_t=c.n_part, full_ptr_t=n_cols + 1, part_ptr_t=n_cols + 1)
    out = _int32_views(sizes, c.device)
    out["masks"] = out["masks"].view(c.n_part, block_m, c.n_words)
    keys = _new_int(n, c.key_dtype, c.device)  # not in the layout's buffer: freed after
    _write_pass(idx, c, out["full_col"], out["part_col"], out["masks"], keys)
    values, order = torch.sort(keys)
    block = 1024
    transposed_lists_kernel[(triton.cdiv(max(n, 2 * n_cols + 1), block),)](
        values, order, out["row_t"], out["part_mask_t"], out["full_ptr_t"], out["part_ptr_t"],
        n, c.n_full, n_cols, max(c.n_qt, 1), n.bit_length() + 1, BLOCK=block)
    row_t = out.pop("row_t")
    tensors = dict(full_ptr=c.ptrs[0], part_ptr=c.ptrs[1], full_row_t=row_t[:c.n_full],
                   part_row_t=row_t[c.n_full:], **out)
    return tensors, c.nnz
