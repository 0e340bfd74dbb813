"""The key-tile lists of the Triton layout build: pointers, placement, order (see
``preprocess.triton``)."""

import triton
import triton.language as tl

from .scan import BIG


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
    partial ones' masks to ``mask_t``: what ``preprocess.torch.transpose_tiles`` gives."""
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
