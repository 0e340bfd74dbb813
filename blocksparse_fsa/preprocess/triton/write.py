"""Pass 2 of the Triton layout build: write each row's tiles at its CSR offsets (see
``preprocess.triton``)."""

import triton
import triton.language as tl

from .scan import (BIG, load_chunk, program_bitmap, read_bitmap, row_setup, scan_chunks,
                   store_tiles, tile_flags)


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
    in ascending spans from ``start[row]``. Each tile's ``preprocess.torch.transpose_keys``
    value goes to
    ``keys`` (full tiles at their position, partial ones after all full ones) and is counted
    per key tile in ``col_count[0 / 1, group * n_kt + kt]`` (zeroed by pass 1). The outputs
    have room for ``cap_f`` full and ``cap_p`` partial tiles (``keys``: ``cap_f + cap_p``);
    nothing is written past that."""
    SPAN_TILES: tl.constexpr = SPAN // N_WORDS
    TILE_WORDS: tl.constexpr = BLOCK_M * N_WORDS
    pid = tl.program_id(0)
    scratch, bitmap_rows = program_bitmap(scratch_ptr, pid, BLOCK_M, SPAN)
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
            row_ptr, row_ok, bound = row_setup(row, idx_ptr, heads, n_qt, q_len, k_len,
                                                causal_offset, stride_idx_b, stride_idx_h,
                                                stride_idx_q, BLOCK_M, IS_CAUSAL)
            base = tl.load(start_ptr + row)
            tl.debug_barrier()  # the bitmap is zero
            while base < BIG:
                _, above, _ = scan_chunks(
                    load_chunk(row_ptr, row_ok, 0, width, stride_idx_w, CHUNK),
                    tl.full([], -1, tl.int32), tl.full([], BIG, tl.int32),
                    tl.zeros([], tl.int32), bitmap_rows, row_ptr, row_ok, bound, base, base,
                    base + SPAN, 0, n_chunks, width, k_len, stride_idx_w, LOG_WB, SPAN, CHUNK,
                    BY_BITS)
                acc = read_bitmap(scratch, BLOCK_M, SPAN)
                touched, full = tile_flags(acc, BLOCK_M, SPAN, N_WORDS, FULL_WORD)
                f0, p0 = store_tiles(acc, touched, full, base >> LOG_NW, full_col_ptr, f0,
                                      cap_f, part_col_ptr, masks_ptr, p0,
                                      tl.minimum(cap_p, cap_kp), keys_ptr, key_f,
                                      keys_part_ptr, key_p, n_qt, count_f_ptr, count_p_ptr,
                                      BLOCK_M, SPAN, N_WORDS, True)
                base = (above >> LOG_NW) << LOG_NW  # BIG when nothing is left
