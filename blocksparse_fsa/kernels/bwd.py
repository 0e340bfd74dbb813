"""Backward: dQ over the forward's tile lists (it also computes rowsum(dO * O)), then dK/dV over
the transposed ones. Each output element is written by exactly one program: no atomics,
deterministic."""

import torch
import triton
import triton.language as tl

from . import config as launch_config
from .common import (DBIAS_KEYS, DBIAS_PAIRS, LOG2E, ORDER_TOKENS, bias_args, bias_rows_of,
                     dim_args, guard_arg, head_map, head_plane, load_bias, load_partial,
                     load_tile, log2_scores, new_empty, perm_args, query_tile, row_range,
                     score_args, tile_bits, tile_keys, tile_queries, tile_source, token_rows,
                     use_tma)


@triton.jit
def _dkdv_tiles(dk, dv, dbias_cols, k, v, k_rows, offs_kn, q_src, do_src, q_plane, do_plane,
                lse_base, delta_base, bias_base, bias_col, dbias_base, row_ptr, mask_idx_ptr,
                masks, start, end, QPerm, perm_d, q_len, k_len, qk_scale, cap_scale, stride_q,
                stride_do, stride_bias, IS_PARTIAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                ORDER: tl.constexpr, SOFTCAP: tl.constexpr, BIAS_ROW: tl.constexpr,
                DBIAS: tl.constexpr, TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                GUARD: tl.constexpr):
    """Accumulate dK, dV of one key tile (keys ``offs_kn``, at ``k_rows``) over the query
    tiles ``row_ptr[start:end]`` of one query head (``q_src``, ``do_src``: ``tile_source``;
    ``q_plane``, ``do_plane``: the same planes for pointer loads).

    The bias comes from ``bias_base`` (this query head's plane; ``None``: no bias), or with
    ``BIAS_ROW`` (one bias row) is ``bias_col``, this key tile's slice of it, loaded once by
    the caller. With a bias, scores and lse are in natural units, else in log2 units.
    With ``dbias_base`` (``None``: no bias gradient), ``DBIAS_PAIRS`` writes each pair's
    score gradient there (an ``[Lq, Lk]`` fp32 plane of this query head), ``DBIAS_KEYS`` sums
    it over the queries into ``dbias_cols``.
    """
    N_WORDS: tl.constexpr = (BLOCK_N + 31) // 32
    offs_i = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    for t in range(start, end):
        qt = tl.load(row_ptr + t).to(tl.int64)
        offs_m = qt * BLOCK_M + offs_i
        q_rows = token_rows(QPerm, offs_m, qt * BLOCK_M, q_len, perm_d, ORDER=ORDER)
        q_ok = d_ok[None, :]
        if IS_PARTIAL:
            mask_idx = tl.load(mask_idx_ptr + t).to(tl.int64)
            tile_mask = masks + mask_idx * (BLOCK_M * N_WORDS)
            # rows that attend no key of this tile read as 0: an empty row's q may be NaN,
            # which would survive dS = 0 in dS @ Q
            rows_used = tile_queries(tile_mask, offs_i, N_WORDS=N_WORDS)  # [BLOCK_M]
            q_ok = q_ok & (offs_m < q_len)[:, None]
            q = load_partial(q_src, q_plane, q_rows, qt * BLOCK_M, q_len, perm_d, stride_q[1],
                             stride_q[3], q_ok, rows_used, BLOCK=BLOCK_M, BLOCK_D=BLOCK_D,
                             ORDER=ORDER, TMA=TMA, GUARD=GUARD)  # [BLOCK_M, BLOCK_D]
        else:
            q = load_tile(q_src, q_rows, qt * BLOCK_M, q_len, perm_d, stride_q[1], stride_q[3],
                          q_ok, BLOCK=BLOCK_M, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA)
        lse = tl.load(lse_base + offs_m, mask=offs_m < q_len, other=0.0)
        if bias_base is not None:
            # natural units; a row whose every key is at -inf (lse = -inf) gets P = 0, not NaN
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
        else:
            lse *= LOG2E
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
        s_t, tanh_t = log2_scores(qk_t, qk_scale, cap_scale, SOFTCAP=SOFTCAP)
        if BIAS_ROW:
            s_t += bias_col[:, None]
        elif bias_base is not None:
            bias_ptrs = (bias_base + q_rows[None, :] * stride_bias[2]
                         + k_rows[:, None] * stride_bias[3])
            if IS_PARTIAL:
                pair_ok = (offs_m[None, :] < q_len) & (offs_kn[:, None] < k_len)
                bias_t = tl.load(bias_ptrs, mask=pair_ok, other=0.0)
            else:
                bias_t = tl.load(bias_ptrs)
            s_t += bias_t.to(tl.float32)  # [BLOCK_N, BLOCK_M]
        if bias_base is not None:
            p_t = tl.math.exp2((s_t - lse[None, :]) * LOG2E)
        else:
            p_t = tl.math.exp2(s_t - lse[None, :])
        if IS_PARTIAL:
            bits_t = tile_bits(tile_mask, offs_i, offs_n, N_WORDS=N_WORDS, TRANSPOSED=True)
            p_t = tl.where(bits_t, p_t, 0.0)
        if IS_PARTIAL:  # an empty row's dO may be NaN, which would survive P = 0 in P @ dO
            do = load_partial(do_src, do_plane, q_rows, qt * BLOCK_M, q_len, perm_d,
                              stride_do[1], stride_do[3], q_ok, rows_used, BLOCK=BLOCK_M,
                              BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA, GUARD=GUARD)
        else:
            do = load_tile(do_src, q_rows, qt * BLOCK_M, q_len, perm_d, stride_do[1],
                           stride_do[3], q_ok, BLOCK=BLOCK_M, BLOCK_D=BLOCK_D, ORDER=ORDER,
                           TMA=TMA)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=offs_m < q_len, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])  # d(score) = d(bias)
        if IS_PARTIAL:  # a key no row of the tile attends may hold NaN (in dP): keep it out
            ds_t = tl.where(bits_t, ds_t, 0.0)
        if dbias_base is not None:
            if DBIAS == DBIAS_PAIRS:
                dbias_ptrs = dbias_base + q_rows[None, :] * k_len + k_rows[:, None]
                if IS_PARTIAL:
                    tl.store(dbias_ptrs, ds_t, mask=(offs_m[None, :] < q_len)
                             & (offs_kn[:, None] < k_len))
                else:
                    tl.store(dbias_ptrs, ds_t)
            else:
                dbias_cols += tl.sum(ds_t, 1)
        if SOFTCAP:  # through softcap * tanh(s / softcap)
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
            if IS_PARTIAL:  # tanh of an unused key's garbage
                ds_t = tl.where(bits_t, ds_t, 0.0)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv, dbias_cols


@triton.jit
def sparse_attn_bwd_dkdv_kernel(
    Q, K, V, Bias, DOut, Lse, Delta, DK, DV, DBias,
    stride_q, stride_k, stride_v, stride_bias, stride_do, stride_dk, stride_dv,
    tiles_t, QPerm, KPerm, perm_d,
    heads, bias_head_div, q_len, k_len, qk_scale, cap_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ORDER: tl.constexpr, SOFTCAP: tl.constexpr, BIAS_ROW: tl.constexpr, DBIAS: tl.constexpr,
    TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUARD: tl.constexpr,
):
    """One program = one key tile of one (batch, KV head), looping over the query heads of its
    group; grid (num_k_tiles, B * Hkv). ``tiles_t`` = (full_ptr_t, full_row_t, part_ptr_t,
    part_row_t, part_mask_t, masks), the layout's transposed lists. Lse and Delta are
    (B, Hq, Lq) float32, contiguous, in the layout's token order (written by the dQ kernel,
    which runs first). DBias (``None``: no bias gradient) is fp32 ``(B, Hq, Lq, Lk)``
    (``DBIAS_PAIRS``) or ``(B, Hq, Lk)`` (``DBIAS_KEYS``), contiguous. Tensors are in the
    caller's token order; the layout's order is ``ORDER``."""
    full_ptr_t, full_row_t, part_ptr_t, part_row_t, part_mask_t, masks = tiles_t
    num_q_heads, group_size, head_div, layout_heads, layout_batch_step = heads
    kt = tl.program_id(0)
    bh = tl.program_id(1)
    num_kv_heads = num_q_heads // group_size
    b = (bh // num_kv_heads).to(tl.int64)
    hk = (bh % num_kv_heads).to(tl.int64)
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
    k_rows = token_rows(KPerm, offs_n, kt.to(tl.int64) * BLOCK_N, k_len, perm_d, ORDER=ORDER)
    rows = k_rows[:, None]
    k = tl.load(head_plane(K, stride_k, b, hk) + rows * stride_k[1]
                + offs_d[None, :] * stride_k[3], mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(head_plane(V, stride_v, b, hk) + rows * stride_v[1]
                + offs_d[None, :] * stride_v[3], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(group_size):
        hq = hk * group_size + g
        row = (b * layout_batch_step * layout_heads + hq // head_div) * tl.num_programs(0) + kt
        q_plane = head_plane(Q, stride_q, b, hq)
        do_plane = head_plane(DOut, stride_do, b, hq)
        q_src = tile_source(q_plane, q_len, stride_q[1], perm_d, BLOCK=BLOCK_M,
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA)
        do_src = tile_source(do_plane, q_len, stride_do[1], perm_d, BLOCK=BLOCK_M,
                             HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA)
        plane = b * num_q_heads + hq
        bias_base = Bias
        bias_col = tl.zeros([BLOCK_N], dtype=tl.float32)
        if Bias is not None:
            bias_base = Bias + b * stride_bias[0] + (hq // bias_head_div) * stride_bias[1]
            if BIAS_ROW:
                bias_col = tl.load(bias_base + k_rows * stride_bias[3], mask=offs_n < k_len,
                                   other=0.0).to(tl.float32)
        dbias_base = DBias
        if DBias is not None:
            if DBIAS == DBIAS_PAIRS:
                dbias_base = DBias + plane * q_len * k_len
            else:
                dbias_base = DBias + plane * k_len
        dbias_cols = tl.zeros([BLOCK_N], dtype=tl.float32)
        start, end = row_range(full_ptr_t, row)
        dk, dv, dbias_cols = _dkdv_tiles(
            dk, dv, dbias_cols, k, v, k_rows, offs_n, q_src, do_src, q_plane, do_plane,
            Lse + plane * q_len, Delta + plane * q_len, bias_base, bias_col, dbias_base,
            full_row_t, full_row_t, masks, start, end, QPerm, perm_d, q_len, k_len, qk_scale,
            cap_scale, stride_q, stride_do, stride_bias, IS_PARTIAL=False, HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ORDER=ORDER, SOFTCAP=SOFTCAP,
            BIAS_ROW=BIAS_ROW, DBIAS=DBIAS, TMA=TMA, INPUT_PRECISION=INPUT_PRECISION,
            GUARD=GUARD)
        start, end = row_range(part_ptr_t, row)
        dk, dv, dbias_cols = _dkdv_tiles(
            dk, dv, dbias_cols, k, v, k_rows, offs_n, q_src, do_src, q_plane, do_plane,
            Lse + plane * q_len, Delta + plane * q_len, bias_base, bias_col, dbias_base,
            part_row_t, part_mask_t, masks, start, end, QPerm, perm_d, q_len, k_len, qk_scale,
            cap_scale, stride_q, stride_do, stride_bias, IS_PARTIAL=True, HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ORDER=ORDER, SOFTCAP=SOFTCAP,
            BIAS_ROW=BIAS_ROW, DBIAS=DBIAS, TMA=TMA, INPUT_PRECISION=INPUT_PRECISION,
            GUARD=GUARD)
        if DBias is not None:
            if DBIAS == DBIAS_KEYS:
                tl.store(dbias_base + k_rows, dbias_cols, mask=offs_n < k_len)
    dk *= softmax_scale
    tl.store(head_plane(DK, stride_dk, b, hk) + rows * stride_dk[1]
             + offs_d[None, :] * stride_dk[3], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(head_plane(DV, stride_dv, b, hk) + rows * stride_dv[1]
             + offs_d[None, :] * stride_dv[3], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_src, v_src, k_plane, bias_rows, row_ok, col_ptr, masks,
              start, end, KPerm, perm_d, k_len, qk_scale, cap_scale, stride_k, stride_v,
              stride_bias,
              IS_PARTIAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
              ORDER: tl.constexpr, SOFTCAP: tl.constexpr, BIAS_ROW: tl.constexpr,
              TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUARD: tl.constexpr):
    """Accumulate dQ of one query tile of ``HEADS`` stacked query heads over the key tiles
    ``col_ptr[start:end]`` (keys where ``token_rows(KPerm, ..., perm_d, ORDER)`` puts them);
    ``bias_rows``, ``row_ok``: as in the forward."""
    N_WORDS: tl.constexpr = (BLOCK_N + 31) // 32
    offs_i = tl.arange(0, HEADS * BLOCK_M) % BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    for t in range(start, end):
        kt = tl.load(col_ptr + t).to(tl.int64)
        offs_kn = kt * BLOCK_N + offs_n
        k_rows = token_rows(KPerm, offs_kn, kt * BLOCK_N, k_len, perm_d, ORDER=ORDER)
        kv_ok = d_ok[None, :]
        if IS_PARTIAL:
            tile_mask = masks + t * (BLOCK_M * N_WORDS)
            kv_ok = kv_ok & (offs_kn < k_len)[:, None]
            # keys no row of the tile attends read as 0 (dS = 0 times NaN is NaN in dS @ K)
            keys_used = tile_keys(tile_mask, tl.arange(0, BLOCK_M), offs_n, N_WORDS=N_WORDS)
            k = load_partial(k_src, k_plane, k_rows, kt * BLOCK_N, k_len, perm_d, stride_k[1],
                             stride_k[3], kv_ok, keys_used, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D,
                             ORDER=ORDER, TMA=TMA, GUARD=GUARD)  # [BLOCK_N, BLOCK_D]
        else:
            k = load_tile(k_src, k_rows, kt * BLOCK_N, k_len, perm_d, stride_k[1], stride_k[3],
                          kv_ok, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA)
        # (garbage in V at a key no row attends reaches dP only, which the bits mask)
        v = load_tile(v_src, k_rows, kt * BLOCK_N, k_len, perm_d, stride_v[1], stride_v[3],
                      kv_ok, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [HEADS*BLOCK_M, BLOCK_N]
        s, tanh = log2_scores(qk, qk_scale, cap_scale, SOFTCAP=SOFTCAP)
        if bias_rows is not None:  # natural units (``score_args``)
            s += load_bias(bias_rows, k_rows, row_ok, offs_kn < k_len, stride_bias[3],
                           IS_PARTIAL=IS_PARTIAL, BIAS_ROW=BIAS_ROW)
            p = tl.math.exp2((s - lse[:, None]) * LOG2E)
        else:
            p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # [HEADS*BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tanh * tanh)
        if IS_PARTIAL:  # inactive pairs: P (and tanh) may be inf or NaN there, dP NaN
            bits = tile_bits(tile_mask, offs_i, offs_n, N_WORDS=N_WORDS, TRANSPOSED=False)
            ds = tl.where(bits, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def sparse_attn_bwd_dq_kernel(
    Q, K, V, Bias, Out, DOut, Lse, DLse, Delta, LseK, DQ,
    stride_q, stride_k, stride_v, stride_bias, stride_o, stride_do, stride_dq,
    tiles, QPerm, KPerm, perm_d,
    heads, bias_head_div, q_len, k_len, qk_scale, cap_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEADS: tl.constexpr, ORDER: tl.constexpr, SOFTCAP: tl.constexpr, BIAS_ROW: tl.constexpr,
    TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUARD: tl.constexpr,
):
    """One program = one query tile of ``HEADS`` consecutive query heads of one batch (sharing
    a KV head and a layout row); grid (num_q_tiles, B * Hq / HEADS). ``tiles``: as in the
    forward. Tensors are in the caller's token order; the layout's order is ``ORDER``.

    It also computes what the dK/dV kernel reads per query row, in the layout's token order
    (contiguous per tile): Delta = rowsum(dO * O) - dLse (``DLse``: ``None`` for 0) and, for a
    reordered layout, LseK = Lse (``None`` in token order). Lse, DLse, Delta and LseK are
    (B, Hq, Lq) float32, contiguous."""
    full_ptr, full_col, part_ptr, part_col, masks = tiles
    b, hk, hq0, row, row_heads, offs_m, q_rows, row_ok, q, k_src, v_src = query_tile(
        Q, K, V, QPerm, stride_q, stride_k, stride_v, heads, q_len, k_len, perm_d,
        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEADS=HEADS,
        ORDER=ORDER, TMA=TMA)
    bias_rows = Bias  # None: no bias
    if Bias is not None:
        bias_rows = bias_rows_of(Bias, stride_bias, b, hq0, row_heads, q_rows, bias_head_div,
                                 BIAS_ROW=BIAS_ROW)
    offs_d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = q_rows[:, None]
    hs = row_heads[:, None]
    do = tl.load(DOut + b * stride_do[0] + hs * stride_do[2] + rows * stride_do[1]
                 + offs_d[None, :] * stride_do[3], mask=ok, other=0.0)  # [HEADS*BLOCK_M, BLOCK_D]
    o = tl.load(Out + b * stride_o[0] + hs * stride_o[2] + rows * stride_o[1]
                + offs_d[None, :] * stride_o[3], mask=ok, other=0.0)
    num_q_heads = heads[0]
    plane = (b * num_q_heads + row_heads) * q_len
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if DLse is not None:
        delta -= tl.load(DLse + plane + q_rows, mask=row_ok, other=0.0)
    lse = tl.load(Lse + plane + q_rows, mask=row_ok, other=0.0)
    tl.store(Delta + plane + offs_m, delta, mask=row_ok)
    if LseK is not None:
        tl.store(LseK + plane + offs_m, lse, mask=row_ok)
    if Bias is not None:
        # natural units; a row whose every key is at -inf (lse = -inf) gets P = 0, not NaN
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
    else:
        lse *= LOG2E

    k_plane = head_plane(K, stride_k, b, hk)
    dq = tl.zeros([HEADS * BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, end = row_range(full_ptr, row)
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_src, v_src, k_plane, bias_rows, row_ok, full_col, masks, start,
        end, KPerm, perm_d, k_len, qk_scale, cap_scale, stride_k, stride_v, stride_bias,
        IS_PARTIAL=False, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HEADS=HEADS, ORDER=ORDER, SOFTCAP=SOFTCAP, BIAS_ROW=BIAS_ROW, TMA=TMA,
        INPUT_PRECISION=INPUT_PRECISION, GUARD=GUARD)
    start, end = row_range(part_ptr, row)
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_src, v_src, k_plane, bias_rows, row_ok, part_col, masks, start,
        end, KPerm, perm_d, k_len, qk_scale, cap_scale, stride_k, stride_v, stride_bias,
        IS_PARTIAL=True, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HEADS=HEADS, ORDER=ORDER, SOFTCAP=SOFTCAP, BIAS_ROW=BIAS_ROW, TMA=TMA,
        INPUT_PRECISION=INPUT_PRECISION, GUARD=GUARD)
    dq *= softmax_scale
    tl.store(DQ + b * stride_dq[0] + hs * stride_dq[2] + rows * stride_dq[1]
             + offs_d[None, :] * stride_dq[3], dq.to(DQ.dtype.element_ty), mask=ok)


def sparse_attn_bwd(do, q, k, v, out, lse, dlse, layout, softmax_scale, softcap=0.0, bias=None,
                    bias_grad=False):
    """Launch the backward kernels, dQ (which also computes rowsum(dO * O)) then dK/dV.
    ``lse`` and ``dlse`` (B, Hq, Lq) float32 contiguous, ``dlse`` or None.

    Returns dq, dk, dv and dbias: the bias' gradient in its own (broadcast) shape, reduced over
    the broadcast dims in a fixed order, zero on inactive pairs (None unless ``bias_grad``).
    A bias with Lq rows needs an fp32 ``(B, Hq, Lq, Lk)`` buffer for it (the bias is that size
    already up to the broadcast); a bias with one row only ``(B, Hq, Lk)``.
    """
    batch, q_len, num_q_heads, head_dim = q.shape
    k_len = k.shape[1]
    dq = new_empty(like=q)
    dk = new_empty(like=k)
    dv = new_empty(like=v)
    delta = new_empty(like=lse)
    perm = perm_args(layout)
    # lse in the layout's token order, for the dK/dV kernel
    lse_k = new_empty(like=lse) if perm["ORDER"] != ORDER_TOKENS else None
    heads = head_map(q, k, layout)
    scores = score_args(softmax_scale, softcap, natural=bias is not None)
    common = dict(heads=heads, q_len=q_len, k_len=k_len, softmax_scale=softmax_scale, **scores,
                  **perm, **dim_args(q), BLOCK_M=layout.block_m, BLOCK_N=layout.block_n,
                  GUARD=guard_arg())
    dbias_mode, dbias_buf = DBIAS_PAIRS, None
    if bias is not None and bias_grad:
        dbias_mode = DBIAS_KEYS if bias.shape[2] == 1 and q_len > 1 else DBIAS_PAIRS
        shape = (batch, num_q_heads) + ((k_len,) if dbias_mode == DBIAS_KEYS else (q_len, k_len))
        dbias_buf = torch.zeros(shape, dtype=torch.float32, device=q.device)
    q_grid = (layout.num_q_tiles, batch * num_q_heads)
    if q_grid[0] * q_grid[1]:
        stack = launch_config.heads_per_program(layout.block_m, heads[1], heads[2], kernel="dq")
        sparse_attn_bwd_dq_kernel[(q_grid[0], q_grid[1] // stack)](
            Q=q, K=k, V=v, Out=out, DOut=do, Lse=lse, DLse=dlse, Delta=delta, LseK=lse_k, DQ=dq,
            **bias_args(bias, q, stack),
            stride_q=q.stride(), stride_k=k.stride(), stride_v=v.stride(), stride_o=out.stride(),
            stride_do=do.stride(), stride_dq=dq.stride(),
            tiles=(layout.full_ptr, layout.full_col, layout.part_ptr, layout.part_col,
                   layout.masks),
            HEADS=stack, TMA=use_tma(layout, k, v), **common,
            **launch_config.get_bwd_config(head_dim, stack * layout.block_m, layout.block_n,
                                           kernel="dq"))
    kv_grid = (layout.num_k_tiles, batch * k.shape[2])
    if kv_grid[0] * kv_grid[1]:
        sparse_attn_bwd_dkdv_kernel[kv_grid](
            Q=q, K=k, V=v, DOut=do, Lse=lse if lse_k is None else lse_k, Delta=delta, DK=dk,
            DV=dv, DBias=dbias_buf, DBIAS=dbias_mode, **bias_args(bias, q),
            stride_q=q.stride(), stride_k=k.stride(), stride_v=v.stride(),
            stride_do=do.stride(), stride_dk=dk.stride(), stride_dv=dv.stride(),
            tiles_t=(layout.full_ptr_t, layout.full_row_t, layout.part_ptr_t,
                     layout.part_row_t, layout.part_mask_t, layout.masks),
            TMA=use_tma(layout, q, do), **common,
            **launch_config.get_bwd_config(head_dim, layout.block_m, layout.block_n,
                                           kernel="dkdv"))
    dbias = None
    if dbias_buf is not None:
        dbias = _reduce_to(dbias_buf if dbias_mode == DBIAS_PAIRS else dbias_buf[:, :, None],
                           bias)
    return dq, dk, dv, dbias


def _reduce_to(grad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sum a ``(B, Hq, Lq|1, Lk)`` fp32 gradient over the dims ``bias`` broadcasts."""
    batch, num_q_heads = grad.shape[:2]
    grad = grad.view(batch, bias.shape[1], num_q_heads // bias.shape[1], *grad.shape[2:]).sum(2)
    if bias.shape[0] == 1:
        grad = grad.sum(0, keepdim=True)
    if bias.shape[2] == 1:
        grad = grad.sum(2, keepdim=True)
    return grad.to(bias.dtype)
