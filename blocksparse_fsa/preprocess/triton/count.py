"""Pass 1 of the Triton layout build: count each row's tiles (see ``preprocess.triton``)."""

import triton
import triton.language as tl

from .scan import (BIG, first_span, load_chunk, load_even, popcount, program_bitmap, read_bitmap,
                   row_setup, scan_chunks, store_tiles, tile_flags, window_bitmap, window_scan)


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
    scratch, bitmap_rows = program_bitmap(scratch_ptr, pid, BLOCK_M, SPAN)
    tiles_t = tl.arange(0, SPAN_TILES)
    n_chunks = tl.cdiv(width, CHUNK)
    nnz = tl.zeros([], tl.int64)
    n_bad = tl.zeros([], tl.int32)
    n_rescanned = tl.zeros([], tl.int32)
    total_full = tl.zeros([], tl.int64)
    total_part = tl.zeros([], tl.int64)
    n_window = tl.zeros([], tl.int32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        row_ptr, row_ok, bound = row_setup(row, idx_ptr, heads, n_qt, q_len, k_len,
                                            causal_offset, stride_idx_b, stride_idx_h,
                                            stride_idx_q, BLOCK_M, IS_CAUSAL)
        c_b = tl.maximum(n_chunks - 1, 1) * CHUNK  # nothing there when chunk 0 is the last one
        window = False
        w_lo = tl.zeros([BLOCK_M], tl.int32)
        w_hi = w_lo
        w_base = tl.zeros([], tl.int32)
        if FAST:  # CHUNK divides the width: vectorized loads (no rows past q_len: bound 0)
            j_a = load_even(row_ptr, 0, width, stride_idx_w, CHUNK)
            j_b = load_even(row_ptr, n_chunks - 1, width, stride_idx_w, CHUNK)
            if WINDOW:
                window, w_lo, w_hi, w_base = window_scan(
                    j_a, j_b, row_ptr, bound, k_len, width, n_chunks, stride_idx_w, LOG_WB,
                    LOG_NW, SPAN, CHUNK, STAGES)
        else:
            j_a = load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK)
            j_b = load_chunk(row_ptr, row_ok, c_b, width, stride_idx_w, CHUNK)
        below = tl.full([], -1, tl.int32)
        above = tl.full([], BIG, tl.int32)
        cov_lo = tl.zeros([], tl.int32)
        cov_hi = tl.zeros([], tl.int32)
        if window:  # one span holds the row: its bitmap in registers
            base = w_base
            acc = window_bitmap(w_lo, w_hi, base, LOG_WB, SPAN)
            n_window += 1
        else:
            acc, base, cov_lo, cov_hi, below, above, n_bad, n_rescanned = first_span(
                j_a, j_b, row_ptr, row_ok, bound, k_len, width, n_chunks, c_b, stride_idx_w,
                scratch, bitmap_rows, n_bad, n_rescanned, BLOCK_M, LOG_NW, LOG_WB, SPAN, CHUNK,
                BY_BITS, FAST, STAGES)
        touched, full = tile_flags(acc, BLOCK_M, SPAN, N_WORDS, FULL_WORD)
        n_full = tl.sum(touched * full, 0)
        n_part = tl.sum(touched, 0) - n_full
        nnz += tl.sum(tl.sum(popcount(acc), 1), 0).to(tl.int64)
        first_t = tl.min(tl.where(touched != 0, tiles_t, SPAN_TILES), 0)
        start = tl.where(first_t < SPAN_TILES, base + first_t * N_WORDS, BIG)
        slot_f = tl.full([], -1, tl.int64)
        slot_p = tl.full([], -1, tl.int64)
        if (below < 0) & (above == BIG):  # one span held the row: pool its tiles
            start = base
            slot_f = tl.atomic_add(stats_ptr + 2, n_full.to(tl.int64), sem="relaxed")
            slot_p = tl.atomic_add(stats_ptr + 3, n_part.to(tl.int64), sem="relaxed")
            if (slot_f + n_full <= pool_full_cap) & (slot_p + n_part <= pool_part_cap):
                store_tiles(acc, touched, full, base >> LOG_NW, pool_full_ptr, slot_f,
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
            below, above, n_bad_span = scan_chunks(
                load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK),
                tl.full([], -1, tl.int32), tl.full([], BIG, tl.int32), tl.zeros([], tl.int32),
                bitmap_rows, row_ptr, row_ok, bound, base, cov_lo, cov_hi, 0, n_chunks, width,
                k_len, stride_idx_w, LOG_WB, SPAN, CHUNK, BY_BITS)
            acc = read_bitmap(scratch, BLOCK_M, SPAN)
            touched, full = tile_flags(acc, BLOCK_M, SPAN, N_WORDS, FULL_WORD)
            n_full += tl.sum(touched * full, 0)
            n_part += tl.sum(touched * (1 - full), 0)
            nnz += tl.sum(tl.sum(popcount(acc), 1), 0).to(tl.int64)
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
