"""The partial tiles' bits of a window / sinks / packed-sequence layout, on the GPU (the tile lists
come from the host, ``preprocess.ranges.range_tiles``)."""

import torch
import triton
import triton.language as tl

from .launch import new_int


@triton.jit
def range_masks_kernel(masks_ptr, lists_ptr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, N_WORDS: tl.constexpr):
    """One program per partial tile ``t`` (grid ``[Tp]``): its ``BLOCK_M`` query rows find their
    sequence in ``cu_q`` (binary search), their window and sink key ranges, and write
    ``masks[t]`` (int32 ``[Tp, BLOCK_M, N_WORDS]``, contiguous; bit ``c % 32`` of word
    ``c // 32`` = key column ``c`` of tile ``part_col[t]``). ``lists_ptr``: the int32 buffer of
    ``preprocess.ranges_numba.range_lists``, whose header holds the scalars (a launch costs
    microseconds per argument) and where ``part_qt``, ``part_col``, ``cu_q`` and ``cu_k`` start.
    """
    t = tl.program_id(0)
    q_len = tl.load(lists_ptr + 0)
    n_seq = tl.load(lists_ptr + 1)
    n_steps = tl.load(lists_ptr + 2)
    left = tl.load(lists_ptr + 3)
    right = tl.load(lists_ptr + 4)
    sinks = tl.load(lists_ptr + 5)
    cu_q_ptr = lists_ptr + tl.load(lists_ptr + 8)
    cu_k_ptr = lists_ptr + tl.load(lists_ptr + 9)
    q_tile = tl.load(lists_ptr + tl.load(lists_ptr + 6) + t)
    k_tile = tl.load(lists_ptr + tl.load(lists_ptr + 7) + t)
    offs_m = tl.arange(0, BLOCK_M)
    rows = q_tile * BLOCK_M + offs_m  # [BLOCK_M]
    # the sequence of each row: how many of cu_q[1:] are <= row
    lo_s = tl.zeros([BLOCK_M], tl.int32)
    hi_s = tl.zeros([BLOCK_M], tl.int32) + n_seq
    for _ in range(n_steps):
        mid = (lo_s + hi_s) // 2
        open_ = lo_s < hi_s
        bound = tl.load(cu_q_ptr + 1 + mid, mask=open_, other=0)
        up = open_ & (bound <= rows)
        lo_s = tl.where(up, mid + 1, lo_s)
        hi_s = tl.where(open_ & (bound > rows), mid, hi_s)
    seq = tl.minimum(lo_s, n_seq - 1)
    q0 = tl.load(cu_q_ptr + seq)
    k0 = tl.load(cu_k_ptr + seq)
    n_k = tl.load(cu_k_ptr + seq + 1) - k0
    pos = rows - q0 + n_k - (tl.load(cu_q_ptr + seq + 1) - q0)  # bottom-right aligned
    top = n_k - 1
    if IS_CAUSAL:
        top = tl.minimum(top, pos)
    top = tl.where(rows < q_len, top, -1)
    lo = tl.maximum(pos - left, 0)
    hi = tl.minimum(pos + right, top)
    s_hi = tl.minimum(sinks - 1, top)
    bit = tl.arange(0, 32)
    out = masks_ptr + t.to(tl.int64) * (BLOCK_M * N_WORDS) + offs_m * N_WORDS
    for w in tl.static_range(N_WORDS):
        in_tile = w * 32 + bit  # [32]
        key = k_tile * BLOCK_N + in_tile[None, :] - k0[:, None]  # [BLOCK_M, 32] local key
        on = (key >= 0) & ((key <= s_hi[:, None])
                           | ((key >= lo[:, None]) & (key <= hi[:, None])))
        on = on & (in_tile[None, :] < BLOCK_N)
        word = tl.sum(on.to(tl.int32) << bit[None, :], axis=1)  # [BLOCK_M]
        tl.store(out + w, word)


def range_masks_triton(lists: torch.Tensor, n_part: int, causal: bool, block_m: int,
                       block_n: int) -> torch.Tensor:
    """Launch :func:`range_masks_kernel` on ``lists`` (``RangeTiles.buffer`` on a CUDA device,
    or on the CPU under ``TRITON_INTERPRET=1``) for its ``n_part`` partial tiles; reads nothing
    back. Returns int32 ``[n_part, block_m, ceil(block_n / 32)]``."""
    n_words = -(-block_n // 32)
    masks = new_int((n_part, block_m, n_words), torch.int32, lists.device)
    if n_part:
        range_masks_kernel[(n_part,)](masks, lists, IS_CAUSAL=bool(causal), BLOCK_M=block_m,
                                      BLOCK_N=block_n, N_WORDS=n_words, num_warps=4)
    return masks
