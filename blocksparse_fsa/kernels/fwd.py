"""Forward: online softmax over the key tiles a query tile touches (full tiles first, unmasked)."""

import torch
import triton
import triton.language as tl

from . import config as launch_config
from .common import (LN2, LOG2E, bias_args, bias_rows_of, dim_args, guard_arg, head_map,
                     head_plane, load_bias, load_partial, load_tile, log2_scores, new_empty,
                     perm_args, query_tile, row_range, score_args, tile_bits, tile_keys,
                     token_rows, use_tma)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, v_plane, bias_rows, row_ok, col_ptr, masks,
               start, end, KPerm, perm_d, k_len, qk_scale, cap_scale, stride_k, stride_v,
               stride_bias,
               IS_PARTIAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
               ORDER: tl.constexpr, SOFTCAP: tl.constexpr, BIAS_ROW: tl.constexpr,
               FOLD_SCALE: tl.constexpr, TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               WARP_SPECIALIZE: tl.constexpr, GUARD: tl.constexpr):
    """Fold the key tiles ``col_ptr[start:end]`` into the running (acc, l_i, m_i) of one query
    tile of ``HEADS`` stacked query heads (rows ``h * BLOCK_M + m``; they share the tiles'
    bits). ``bias_rows``: see ``bias_rows_of`` (``None``: no bias); ``row_ok``: rows < Lq;
    keys are read where ``token_rows(KPerm, ..., perm_d, ORDER)`` puts them. ``FOLD_SCALE``
    (no softcap, no bias, ``qk_scale`` > 0): the scores stay raw products, the row max is
    scaled once and each score inside the exp2's fused multiply-add (the same values:
    rounding is monotonic). With a bias, scores and ``m_i`` are in natural units."""
    N_WORDS: tl.constexpr = (BLOCK_N + 31) // 32
    offs_m = tl.arange(0, HEADS * BLOCK_M) % BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    for t in tl.range(start, end, warp_specialize=WARP_SPECIALIZE):
        kt = tl.load(col_ptr + t).to(tl.int64)
        offs_kn = kt * BLOCK_N + offs_n
        k_rows = token_rows(KPerm, offs_kn, kt * BLOCK_N, k_len, perm_d, ORDER=ORDER)
        kv_ok = d_ok[None, :]
        if IS_PARTIAL:
            tile_mask = masks + t * (BLOCK_M * N_WORDS)
            kv_ok = kv_ok & (offs_kn < k_len)[:, None]
        k = load_tile(k_src, k_rows, kt * BLOCK_N, k_len, perm_d, stride_k[1], stride_k[3],
                      kv_ok, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D, ORDER=ORDER,
                      TMA=TMA)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [HEADS*BLOCK_M, BLOCK_N]
        if not FOLD_SCALE:
            s, _ = log2_scores(s, qk_scale, cap_scale, SOFTCAP=SOFTCAP)
            if bias_rows is not None:
                s += load_bias(bias_rows, k_rows, row_ok, offs_kn < k_len, stride_bias[3],
                               IS_PARTIAL=IS_PARTIAL, BIAS_ROW=BIAS_ROW)
        if IS_PARTIAL:  # (garbage in K at a key no row attends ends here, as -inf)
            bits = tile_bits(tile_mask, offs_m, offs_n, N_WORDS=N_WORDS, TRANSPOSED=False)
            s = tl.where(bits, s, float("-inf"))
        if FOLD_SCALE:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if IS_PARTIAL or bias_rows is not None:
            # a row with no finite score so far keeps m = -inf: shift by 0 so exp2 gives 0, not
            # NaN (without a bias, the full tiles visited first make every row's m finite)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        if FOLD_SCALE:
            p = tl.math.exp2(s * qk_scale - m_new_safe[:, None])
            alpha = tl.math.exp2(m_i - m_new_safe)
        elif bias_rows is not None:  # natural units: the difference first (finfo.min is finite)
            p = tl.math.exp2((s - m_new_safe[:, None]) * LOG2E)
            alpha = tl.math.exp2((m_i - m_new_safe) * LOG2E)
        else:
            p = tl.math.exp2(s - m_new_safe[:, None])
            alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IS_PARTIAL:  # keys no row of the tile attends read as 0 (P = 0 times NaN is NaN)
            keys_used = tile_keys(tile_mask, tl.arange(0, BLOCK_M), offs_n, N_WORDS=N_WORDS)
            v = load_partial(v_src, v_plane, k_rows, kt * BLOCK_N, k_len, perm_d, stride_v[1],
                             stride_v[3], kv_ok, keys_used, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D,
                             ORDER=ORDER, TMA=TMA, GUARD=GUARD)
        else:
            v = load_tile(v_src, k_rows, kt * BLOCK_N, k_len, perm_d, stride_v[1], stride_v[3],
                          kv_ok, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def sparse_attn_fwd_kernel(
    Q, K, V, Bias, Out, Lse,
    stride_q, stride_k, stride_v, stride_bias, stride_o,
    tiles, QPerm, KPerm, perm_d,
    heads, bias_head_div, q_len, k_len, qk_scale, cap_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEADS: tl.constexpr, ORDER: tl.constexpr, SOFTCAP: tl.constexpr, BIAS_ROW: tl.constexpr,
    FOLD_SCALE: tl.constexpr, TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, GUARD: tl.constexpr,
):
    """One program = one query tile of ``HEADS`` consecutive query heads of one batch, which
    share a KV head and a layout row (one K/V tile load serves all of them); grid
    (num_q_tiles, B * Hq / HEADS). ``tiles`` = (full_ptr, full_col, part_ptr, part_col, masks)
    of the layout. q/k/v/out (B, L, H, D); lse (B, Hq, Lq) float32, contiguous, natural log.
    Rows with no active key (or only keys at a bias of -inf) get out = 0 and lse = -inf.
    Tensors are in the caller's token order; the layout's order is ``ORDER``.
    """
    full_ptr, full_col, part_ptr, part_col, masks = tiles
    b, hk, hq0, row, row_heads, offs_m, q_rows, row_ok, q, k_src, v_src = query_tile(
        Q, K, V, QPerm, stride_q, stride_k, stride_v, heads, q_len, k_len, perm_d,
        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEADS=HEADS,
        ORDER=ORDER, TMA=TMA)
    v_plane = head_plane(V, stride_v, b, hk)
    bias_rows = Bias  # None: no bias
    if Bias is not None:
        bias_rows = bias_rows_of(Bias, stride_bias, b, hq0, row_heads, q_rows, bias_head_div,
                                 BIAS_ROW=BIAS_ROW)
    acc = tl.zeros([HEADS * BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([HEADS * BLOCK_M], dtype=tl.float32)
    m_i = tl.full([HEADS * BLOCK_M], float("-inf"), dtype=tl.float32)
    start, end = row_range(full_ptr, row)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_src, v_src, v_plane, bias_rows, row_ok, full_col, masks, start,
        end, KPerm, perm_d, k_len, qk_scale, cap_scale, stride_k, stride_v, stride_bias,
        IS_PARTIAL=False, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HEADS=HEADS, ORDER=ORDER, SOFTCAP=SOFTCAP, BIAS_ROW=BIAS_ROW, FOLD_SCALE=FOLD_SCALE,
        TMA=TMA, INPUT_PRECISION=INPUT_PRECISION, WARP_SPECIALIZE=WARP_SPECIALIZE,
        GUARD=GUARD)
    start, end = row_range(part_ptr, row)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_src, v_src, v_plane, bias_rows, row_ok, part_col, masks, start,
        end, KPerm, perm_d, k_len, qk_scale, cap_scale, stride_k, stride_v, stride_bias,
        IS_PARTIAL=True, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HEADS=HEADS, ORDER=ORDER, SOFTCAP=SOFTCAP, BIAS_ROW=BIAS_ROW, FOLD_SCALE=FOLD_SCALE,
        TMA=TMA, INPUT_PRECISION=INPUT_PRECISION, WARP_SPECIALIZE=WARP_SPECIALIZE,
        GUARD=GUARD)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if Bias is not None:  # m_i in natural units
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe) * LN2)
    else:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = (Out + b * stride_o[0] + row_heads[:, None] * stride_o[2]
              + q_rows[:, None] * stride_o[1] + offs_d[None, :] * stride_o[3])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    num_q_heads = heads[0]
    tl.store(Lse + (b * num_q_heads + row_heads) * q_len + q_rows, lse, mask=row_ok)


def sparse_attn_fwd(q, k, v, layout, softmax_scale, softcap=0.0, bias=None):
    """Launch the forward kernel. Returns ``out`` (like q) and ``lse`` (B, Hq, Lq) float32.
    ``bias``: optional ``(B|1, Hq|Hkv|1, Lq|1, Lk)`` added to the (capped) scaled scores.
    Every tensor is in the caller's token order, also for a reordered layout."""
    batch, q_len, num_q_heads, head_dim = q.shape
    out = new_empty(like=q)
    lse = new_empty(batch, num_q_heads, q_len, dtype=torch.float32, device=q.device)
    heads = head_map(q, k, layout)
    stack = launch_config.heads_per_program(layout.block_m, heads[1], heads[2])
    grid = (layout.num_q_tiles, batch * num_q_heads // stack)
    if grid[0] * grid[1] == 0:
        return out, lse
    tma = use_tma(layout, k, v)
    cfg = dict(launch_config.get_fwd_config(head_dim, stack * layout.block_m, layout.block_n))
    warp_specialize = cfg.pop("warp_specialize", False) and tma
    sparse_attn_fwd_kernel[grid](
        Q=q, K=k, V=v, Out=out, Lse=lse, **bias_args(bias, q, stack),
        stride_q=q.stride(), stride_k=k.stride(), stride_v=v.stride(), stride_o=out.stride(),
        tiles=(layout.full_ptr, layout.full_col, layout.part_ptr, layout.part_col,
               layout.masks),
        **perm_args(layout), heads=heads, q_len=q_len, k_len=k.shape[1],
        **score_args(softmax_scale, softcap, natural=bias is not None), **dim_args(q),
        BLOCK_M=layout.block_m, BLOCK_N=layout.block_n, HEADS=stack, TMA=tma,
        FOLD_SCALE=bias is None and not softcap and softmax_scale > 0,
        WARP_SPECIALIZE=warp_specialize, GUARD=guard_arg(), **cfg,
    )
    return out, lse
