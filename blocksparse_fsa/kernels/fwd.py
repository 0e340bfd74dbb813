"""Forward: online softmax over the key tiles a query tile touches (full tiles first, unmasked)."""

import torch
import triton
import triton.language as tl

from .common import (LN2, LOG2E, bias_args, bias_rows_of, launch_args, load_bias, load_tile,
                     log2_scores, new_empty, perm_args, query_program, row_range, score_args,
                     stride_args, tile_bits, tile_keys, tile_source, token_rows,
                     use_tma)
from . import config as launch_config


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, col_ptr, masks, KPerm, perm_d, start, end,
               qk_scale, cap_scale, bias_rows, row_ok, k_len,
               stride_kl, stride_kd, stride_vl, stride_vd, stride_biasn,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, N_WORDS: tl.constexpr, HEADS: tl.constexpr,
               IS_PARTIAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_ROW: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               TMA: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """Fold the tiles ``col_ptr[start:end]`` into the running (acc, l_i, m_i) of one query tile
    of ``HEADS`` stacked query heads (rows ``h * BLOCK_M + m``; they share the tiles' bits).
    ``bias_rows``: see ``bias_rows_of`` (``HAS_BIAS``); ``row_ok``: rows < Lq; keys are read
    as ``token_rows(KPerm, ..., perm_d, PERMUTED)`` gives them. ``FOLD_SCALE`` (no softcap,
    no bias, ``qk_scale`` > 0): the scores stay raw products, the row max is scaled once and
    each score inside the exp2's fused multiply-add (the same values: rounding is monotonic)."""
    offs_m = tl.arange(0, HEADS * BLOCK_M) % BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for t in range(start, end):
        kt = tl.load(col_ptr + t).to(tl.int64)
        offs_kn = kt * BLOCK_N + offs_n
        k_rows = token_rows(KPerm, offs_kn, kt * BLOCK_N, k_len, perm_d, PERMUTED)
        kv_ok = d_ok[None, :]
        if IS_PARTIAL:
            tile_mask = masks + t * (BLOCK_M * N_WORDS)
            # keys no row of the tile attends read as 0: NaN there would survive P = 0 in P @ V
            keys_used = tile_keys(tile_mask, offs_m, offs_n, N_WORDS)  # [BLOCK_N]
            kv_ok = kv_ok & ((offs_kn < k_len) & keys_used)[:, None]
        k = load_tile(k_base, k_rows, kt * BLOCK_N, k_len, perm_d, stride_kl, stride_kd, kv_ok,
                      BLOCK_N, BLOCK_D, PERMUTED, TMA)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [HEADS*BLOCK_M, BLOCK_N]
        if not FOLD_SCALE:
            s, _ = log2_scores(s, qk_scale, cap_scale, SOFTCAP)
            if HAS_BIAS:
                s += load_bias(bias_rows, k_rows, row_ok, offs_kn < k_len, stride_biasn,
                               IS_PARTIAL, BIAS_ROW)
        if IS_PARTIAL:
            bits = tile_bits(tile_mask, offs_m, offs_n, N_WORDS, False)
            s = tl.where(bits, s, float("-inf"))
        if FOLD_SCALE:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if IS_PARTIAL or HAS_BIAS:
            # a row with no finite score so far keeps m = -inf: shift by 0 so exp2 gives 0, not
            # NaN (without a bias, the full tiles visited first make every row's m finite)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        if FOLD_SCALE:
            p = tl.math.exp2(s * qk_scale - m_new_safe[:, None])
            alpha = tl.math.exp2(m_i - m_new_safe)
        elif HAS_BIAS:  # natural units: the difference first, so that finfo.min cannot overflow
            p = tl.math.exp2((s - m_new_safe[:, None]) * LOG2E)
            alpha = tl.math.exp2((m_i - m_new_safe) * LOG2E)
        else:
            p = tl.math.exp2(s - m_new_safe[:, None])
            alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_base, k_rows, kt * BLOCK_N, k_len, perm_d, stride_vl, stride_vd, kv_ok,
                      BLOCK_N, BLOCK_D, PERMUTED, TMA)
        if IS_PARTIAL and TMA:  # a TMA box has no mask
            v = tl.where(keys_used[:, None], v, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def sparse_attn_fwd_kernel(
    Q, K, V, Bias, Out, Lse,
    full_ptr, full_col, part_ptr, part_col, masks, QPerm, KPerm, perm_d,
    qk_scale, cap_scale, q_len, k_len, num_q_heads, group_size, head_div, layout_heads,
    layout_batch_step, bias_head_div,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_lse_b, stride_lse_h,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    N_WORDS: tl.constexpr, HEADS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, FOLD_SCALE: tl.constexpr,
):
    """One program = one query tile of ``HEADS`` consecutive query heads of one batch, which
    share a KV head and a layout row (one K/V tile load serves all of them); grid
    (num_q_tiles, B * Hq / HEADS). q/k/v/out are (B, L, H, D) with any strides; lse is
    (B, Hq, Lq) float32, natural log. Rows with no active key get out = 0 and lse = -inf.
    An optional bias (``HAS_BIAS``, broadcast dims with stride 0) is added to the scores.
    With ``PERMUTED`` the tiles are in the layout's token order and every tensor is read and
    written through ``QPerm`` / ``KPerm`` (kernel row r is the caller's row QPerm[r]), or
    through the dilation order they hold, computed (``common.token_rows``).
    """
    b, hk, hq0, row, heads, offs_m = query_program(num_q_heads, group_size, head_div,
                                                   layout_heads, layout_batch_step, HEADS, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    q_rows = token_rows(QPerm, offs_m, q_start, q_len, perm_d, PERMUTED)
    q_ptrs = (Q + b * stride_qb + heads[:, None] * stride_qh
              + q_rows[:, None] * stride_ql + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [HEADS*BLOCK_M, BLOCK_D]
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    k_base = tile_source(k_base, k_len, stride_kl, perm_d, BLOCK_N, HEAD_DIM, BLOCK_D, PERMUTED,
                         TMA)
    v_base = tile_source(v_base, k_len, stride_vl, perm_d, BLOCK_N, HEAD_DIM, BLOCK_D, PERMUTED,
                         TMA)
    bias_rows = bias_rows_of(Bias, b, hq0, heads, q_rows, bias_head_div, stride_biasb,
                             stride_biash, stride_biasm, BIAS_ROW)

    acc = tl.zeros([HEADS * BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([HEADS * BLOCK_M], dtype=tl.float32)
    m_i = tl.full([HEADS * BLOCK_M], float("-inf"), dtype=tl.float32)
    start, end = row_range(full_ptr, row)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, full_col, masks, KPerm, perm_d,
        start, end, qk_scale, cap_scale, bias_rows, m_ok, k_len,
        stride_kl, stride_kd, stride_vl, stride_vd, stride_biasn,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, N_WORDS, HEADS, False, SOFTCAP, HAS_BIAS,
        BIAS_ROW, PERMUTED, INPUT_PRECISION, TMA, FOLD_SCALE)
    start, end = row_range(part_ptr, row)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, part_col, masks, KPerm, perm_d,
        start, end, qk_scale, cap_scale, bias_rows, m_ok, k_len,
        stride_kl, stride_kd, stride_vl, stride_vd, stride_biasn,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, N_WORDS, HEADS, True, SOFTCAP, HAS_BIAS,
        BIAS_ROW, PERMUTED, INPUT_PRECISION, TMA, FOLD_SCALE)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_BIAS:  # m_i in natural units
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe) * LN2)
    else:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = (Out + b * stride_ob + heads[:, None] * stride_oh
              + q_rows[:, None] * stride_ol + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lse_b + heads * stride_lse_h + q_rows, lse, mask=m_ok)


def sparse_attn_fwd(q, k, v, layout, softmax_scale, softcap=0.0, bias=None):
    """Launch the forward kernel. Returns ``out`` (like q) and ``lse`` (B, Hq, Lq) float32.
    ``bias``: optional ``(B|1, Hq|Hkv|1, Lq|1, Lk)`` added to the (capped) scaled scores.
    Every tensor is in the caller's token order, also for a reordered layout."""
    batch, q_len, num_q_heads, head_dim = q.shape
    out = new_empty(like=q)
    lse = new_empty(batch, num_q_heads, q_len, dtype=torch.float32, device=q.device)
    args = launch_args(q, k, layout)
    heads = launch_config.heads_per_program(layout.block_m, args["group_size"], args["head_div"])
    grid = (layout.num_q_tiles, batch * num_q_heads // heads)
    if grid[0] * grid[1] == 0:
        return out, lse
    sparse_attn_fwd_kernel[grid](
        Q=q, K=k, V=v, Out=out, Lse=lse, **bias_args(bias, q, heads),
        full_ptr=layout.full_ptr, full_col=layout.full_col, part_ptr=layout.part_ptr,
        part_col=layout.part_col, masks=layout.masks, **perm_args(layout, q),
        q_len=q_len, k_len=k.shape[1], **score_args(softmax_scale, softcap, natural=bias is not None),
        stride_lse_b=lse.stride(0), stride_lse_h=lse.stride(1),
        HEADS=heads, **args, **stride_args(q=q, k=k, v=v, o=out),
        TMA=use_tma(layout, k, v),
        FOLD_SCALE=bias is None and not softcap and softmax_scale > 0,
        **launch_config.get_fwd_config(head_dim, heads * layout.block_m, layout.block_n),
    )
    return out, lse
