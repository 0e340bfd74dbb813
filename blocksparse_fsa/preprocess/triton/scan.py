"""The Triton layout build's shared device code: reading a row's indices in chunks and
merging their bits into the program's span bitmap (see ``preprocess.triton``)."""

import triton
import triton.language as tl

BIG = tl.constexpr(1 << 30)  # no word: above every real word (< 2**27)


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
def load_chunk(row_ptr, row_ok, c0, n_cols, stride_idx_w, CHUNK: tl.constexpr):
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
        word, bad = _words(load_chunk(row_ptr, row_ok, c0, n_cols, stride_idx_w, CHUNK), bound,
                           k_len, LOG_WB)
        below = tl.maximum(below, tl.max(tl.max(tl.where(word < cov_lo, word, -1), 1), 0))
        above = tl.minimum(above, tl.min(tl.min(tl.where(word >= cov_hi, word, BIG), 1), 0))
        n_bad += tl.sum(tl.sum(bad.to(tl.int32), 1), 0)
    return below, above, n_bad


@triton.jit
def scan_chunks(j, below, above, n_bad, bitmap_rows, row_ptr, row_ok, bound, base, cov_lo,
                 cov_hi, c_begin, c_end, width, k_len, stride_idx_w, LOG_WB: tl.constexpr,
                 SPAN: tl.constexpr, CHUNK: tl.constexpr, BY_BITS: tl.constexpr):
    """``_scan_chunk`` over chunks ``[c_begin, c_end)``, loading one chunk ahead (``j``: chunk
    ``c_begin``, which the caller loaded); returns the updated ``below, above, n_bad``. The
    caller zeroes the bitmap first and reads it after."""
    n_cols = tl.minimum(width, c_end * CHUNK)
    for c in range(c_begin, c_end):
        j_next = load_chunk(row_ptr, row_ok, (c + 1) * CHUNK, n_cols, stride_idx_w, CHUNK)
        below, above, n_bad = _scan_chunk(j, c * CHUNK, n_cols, row_ptr, row_ok, bound, k_len,
                                          stride_idx_w, bitmap_rows, base, cov_lo, cov_hi,
                                          below, above, n_bad, LOG_WB, SPAN, CHUNK,
                                          BY_BITS)
        j = j_next
    return below, above, n_bad


@triton.jit
def load_even(row_ptr, c, width, stride_idx_w, CHUNK: tl.constexpr):
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
        j = load_even(row_ptr, c, width, stride_idx_w, CHUNK)
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
def window_scan(j_a, j_b, row_ptr, bound, k_len, width, n_chunks, stride_idx_w,
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
            j = load_even(row_ptr, c, width, stride_idx_w, CHUNK)
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
def window_bitmap(lo, hi, base, LOG_WB: tl.constexpr, SPAN: tl.constexpr):
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
def program_bitmap(scratch_ptr, pid, BLOCK_M: tl.constexpr, SPAN: tl.constexpr):
    """Program ``pid``'s scratch bitmap ``[BLOCK_M, SPAN]`` words, zeroed: its base and the
    pointers to its rows ``[BLOCK_M, 1]``."""
    scratch = scratch_ptr + pid.to(tl.int64) * (BLOCK_M * SPAN)
    bitmap_rows = scratch + tl.arange(0, BLOCK_M)[:, None] * SPAN
    tl.store(bitmap_rows + tl.arange(0, SPAN)[None, :],
             tl.zeros([BLOCK_M, SPAN], tl.int32), cache_modifier=".cg")
    return scratch, bitmap_rows


@triton.jit
def read_bitmap(scratch, BLOCK_M: tl.constexpr, SPAN: tl.constexpr):
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
def tile_flags(acc, BLOCK_M: tl.constexpr, SPAN: tl.constexpr, N_WORDS: tl.constexpr,
                FULL_WORD: tl.constexpr):
    """Span bitmap -> (touched, full) int32 flags of its tiles, ``[SPAN // N_WORDS]``. A tile
    is full when every bit is set (queries past q_len and keys past k_len never are)."""
    acc3 = tl.reshape(acc, [BLOCK_M, SPAN // N_WORDS, N_WORDS])
    touched = (tl.max(tl.max(acc3, 2), 0) != 0).to(tl.int32)
    full = (tl.min(tl.min(acc3, 2), 0) == FULL_WORD).to(tl.int32)
    return touched, full


@triton.jit
def popcount(x):
    """Set bits of each uint32 word."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def store_tiles(acc, touched, full, kt0, full_col_ptr, f0, cap_f, part_col_ptr, masks_ptr, p0,
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
def row_setup(row, idx_ptr, heads, n_qt, q_len, k_len, causal_offset, stride_idx_b,
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
def first_span(j_a, j_b, row_ptr, row_ok, bound, k_len, width, n_chunks, c_b, stride_idx_w,
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
            j_a = load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK)
            j_b = load_chunk(row_ptr, row_ok, c_b, width, stride_idx_w, CHUNK)
        j_1 = load_chunk(row_ptr, row_ok, CHUNK, (n_chunks - 1) * CHUNK, stride_idx_w,
                          CHUNK)
        below, above, n_bad = _scan_chunk(j_a, 0, width, row_ptr, row_ok, bound, k_len,
                                          stride_idx_w, bitmap_rows, base, cov_lo, cov_hi,
                                          below, above, n_bad, LOG_WB, SPAN, CHUNK,
                                          BY_BITS)
        below, above, n_bad = _scan_chunk(j_b, c_b, width, row_ptr, row_ok, bound, k_len,
                                          stride_idx_w, bitmap_rows, base, cov_lo, cov_hi,
                                          below, above, n_bad, LOG_WB, SPAN, CHUNK,
                                          BY_BITS)
        below, above, n_bad = scan_chunks(j_1, below, above, n_bad, bitmap_rows, row_ptr,
                                           row_ok, bound, base, cov_lo, cov_hi, 1,
                                           n_chunks - 1, width, k_len, stride_idx_w, LOG_WB,
                                           SPAN, CHUNK, BY_BITS)
    acc = read_bitmap(scratch, BLOCK_M, SPAN)
    return acc, base, cov_lo, cov_hi, below, above, n_bad, n_rescanned
