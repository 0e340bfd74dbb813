"""Backward: rowsum(dO * O), then dK/dV over the transposed tile lists and dQ over the forward
ones. Each output element is written by exactly one program: no atomics, deterministic."""

import torch
import triton
import triton.language as tl

from .common import (LOG2E, bias_args, bias_rows_of, launch_args, load_bias, load_tile,
                     log2_scores, new_empty, perm_args, query_program, row_range, score_args,
                     stride_args, tile_bits, tile_keys, tile_queries, tile_source,
                     token_rows, use_tma)
from . import config as launch_config


@triton.jit
def sparse_attn_bwd_preprocess(
    Out, DOut, DLse, Delta, q_len, num_q_heads,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_dob, stride_dol, stride_doh, stride_dod,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLse for one query tile of one (batch, head); grid
    (num_q_tiles, B * Hq). Delta and DLse are (B, Hq, Lq) float32, contiguous. (The gather
    backward's; the tile walker's dQ kernel computes delta itself.)"""
    qt = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_q_heads
    h = bh % num_q_heads
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_ol
                + offs_d[None, :] * stride_od, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_dob + h * stride_doh + rows * stride_dol
                 + offs_d[None, :] * stride_dod, mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)  # [BLOCK_M]
    if HAS_DLSE:
        delta -= tl.load(DLse + bh * q_len + offs_m, mask=offs_m < q_len, other=0.0)
    tl.store(Delta + bh * q_len + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_tiles(dk, dv, dbias_cols, k, v, q_base, do_base, lse_base, delta_base, bias_base,
                bias_col, dbias_base, row_ptr, mask_idx_ptr, masks, QPerm, perm_d,
                k_rows, start, end, qk_scale, cap_scale, q_len, k_len, kt,
                stride_ql, stride_qd, stride_dol, stride_dod, stride_biasm, stride_biasn,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, N_WORDS: tl.constexpr, IS_PARTIAL: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ROW: tl.constexpr,
                DBIAS: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                TMA: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles ``row_ptr[start:end]``.

    The bias comes from ``bias_base`` (this query head's plane), or with ``BIAS_ROW`` (one bias
    row) is ``bias_col``, this key tile's slice of it, loaded once by the caller. With a bias,
    scores and lse are in natural units (``score_args``), else in log2 units.

    With a bias, ``DBIAS`` = 1 writes each pair's score gradient to ``dbias_base`` (one
    ``[Lq, Lk]`` fp32 plane of this query head), ``DBIAS`` = 2 sums it over the queries into
    ``dbias_cols`` (a bias with one row), 0 skips it.
    """
    offs_i = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_kn = kt * BLOCK_N + offs_n
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for t in range(start, end):
        qt = tl.load(row_ptr + t).to(tl.int64)
        offs_m = qt * BLOCK_M + offs_i
        q_rows = token_rows(QPerm, offs_m, qt * BLOCK_M, q_len, perm_d, PERMUTED)
        q_ok = d_ok[None, :]
        if IS_PARTIAL:
            mask_idx = tl.load(mask_idx_ptr + t).to(tl.int64)
            tile_mask = masks + mask_idx * (BLOCK_M * N_WORDS)
            # rows that attend no key of this tile read as 0: an empty row's q may be NaN,
            # which would survive dS = 0 in dS @ Q
            rows_used = tile_queries(tile_mask, offs_i, N_WORDS)  # [BLOCK_M]
            q_ok = q_ok & ((offs_m < q_len) & rows_used)[:, None]
        q = load_tile(q_base, q_rows, qt * BLOCK_M, q_len, perm_d, stride_ql, stride_qd, q_ok,
                      BLOCK_M, BLOCK_D, PERMUTED, TMA)  # [BLOCK_M, BLOCK_D]
        if IS_PARTIAL and TMA:  # a TMA box has no mask
            q = tl.where(rows_used[:, None], q, 0.0)
        lse = tl.load(lse_base + offs_m, mask=offs_m < q_len, other=0.0)
        if HAS_BIAS:
            # natural units; a row whose every key is at -inf (lse = -inf) gets P = 0, not NaN
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
        else:
            lse *= LOG2E
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
        s_t, tanh_t = log2_scores(qk_t, qk_scale, cap_scale, SOFTCAP)  # [BLOCK_N, BLOCK_M]
        if BIAS_ROW:
            s_t += bias_col[:, None]
        elif HAS_BIAS:
            bias_ptrs = bias_base + q_rows[None, :] * stride_biasm + k_rows[:, None] * stride_biasn
            if IS_PARTIAL:
                pair_ok = (offs_m[None, :] < q_len) & (offs_kn[:, None] < k_len)
                bias_t = tl.load(bias_ptrs, mask=pair_ok, other=0.0)
            else:
                bias_t = tl.load(bias_ptrs)
            s_t += bias_t.to(tl.float32)  # [BLOCK_N, BLOCK_M]
        if HAS_BIAS:
            p_t = tl.math.exp2((s_t - lse[None, :]) * LOG2E)
        else:
            p_t = tl.math.exp2(s_t - lse[None, :])
        if IS_PARTIAL:
            bits_t = tile_bits(tile_mask, offs_i, offs_n, N_WORDS, True)
            p_t = tl.where(bits_t, p_t, 0.0)
        do = load_tile(do_base, q_rows, qt * BLOCK_M, q_len, perm_d, stride_dol, stride_dod, q_ok,
                       BLOCK_M, BLOCK_D, PERMUTED, TMA)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=offs_m < q_len, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])  # d(score) = d(bias)
        if IS_PARTIAL:  # a key no row of the tile attends may hold NaN (in dP): keep it out
            ds_t = tl.where(bits_t, ds_t, 0.0)
        if DBIAS == 1:
            dbias_ptrs = dbias_base + q_rows[None, :] * k_len + k_rows[:, None]
            if IS_PARTIAL:
                tl.store(dbias_ptrs, ds_t, mask=(offs_m[None, :] < q_len)
                         & (offs_kn[:, None] < k_len))
            else:
                tl.store(dbias_ptrs, ds_t)
        if DBIAS == 2:
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
    full_ptr_t, full_row_t, part_ptr_t, part_row_t, part_mask_t, masks, QPerm, KPerm,
    perm_d,
    qk_scale, cap_scale, softmax_scale, q_len, k_len, num_q_heads, group_size, head_div,
    layout_heads, layout_batch_step, bias_head_div,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_dkb, stride_dkl, stride_dkh, stride_dkd,
    stride_dvb, stride_dvl, stride_dvh, stride_dvd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    N_WORDS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ROW: tl.constexpr,
    DBIAS: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """One program = one key tile of one (batch, KV head), looping over the query heads of its
    group; grid (num_k_tiles, B * Hkv). Lse and Delta are (B, Hq, Lq) float32, contiguous, in
    the layout's token order (written by the dQ kernel, which runs first).
    DBias (``DBIAS`` > 0) is fp32 ``(B, Hq, Lq, Lk)`` (1) or ``(B, Hq, Lk)`` (2), contiguous.
    Tensors are in the caller's token order (``PERMUTED``: see the forward kernel)."""
    kt = tl.program_id(0)
    bh = tl.program_id(1)
    num_kv_heads = num_q_heads // group_size
    b = (bh // num_kv_heads).to(tl.int64)
    hk = (bh % num_kv_heads).to(tl.int64)
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
    k_rows = token_rows(KPerm, offs_n, kt.to(tl.int64) * BLOCK_N, k_len, perm_d, PERMUTED)
    rows = k_rows[:, None]
    k = tl.load(K + b * stride_kb + hk * stride_kh + rows * stride_kl + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + hk * stride_vh + rows * stride_vl + offs_d[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(group_size):
        hq = hk * group_size + g
        row = (b * layout_batch_step * layout_heads + hq // head_div) * tl.num_programs(0) + kt
        q_base = Q + b * stride_qb + hq * stride_qh
        do_base = DOut + b * stride_dob + hq * stride_doh
        q_base = tile_source(q_base, q_len, stride_ql, perm_d, BLOCK_M, HEAD_DIM, BLOCK_D,
                             PERMUTED, TMA)
        do_base = tile_source(do_base, q_len, stride_dol, perm_d, BLOCK_M, HEAD_DIM, BLOCK_D,
                              PERMUTED, TMA)
        lse_base = Lse + (b * num_q_heads + hq) * q_len
        delta_base = Delta + (b * num_q_heads + hq) * q_len
        bias_base = Bias + b * stride_biasb + (hq // bias_head_div) * stride_biash
        bias_col = tl.zeros([BLOCK_N], dtype=tl.float32)
        if BIAS_ROW:
            bias_col = tl.load(bias_base + k_rows * stride_biasn, mask=offs_n < k_len,
                               other=0.0).to(tl.float32)
        plane = b * num_q_heads + hq
        if DBIAS == 1:
            dbias_base = DBias + plane * q_len * k_len
        else:
            dbias_base = DBias + plane * k_len
        dbias_cols = tl.zeros([BLOCK_N], dtype=tl.float32)
        start, end = row_range(full_ptr_t, row)
        dk, dv, dbias_cols = _dkdv_tiles(
            dk, dv, dbias_cols, k, v, q_base, do_base, lse_base, delta_base, bias_base,
            bias_col, dbias_base, full_row_t, full_row_t, masks, QPerm, perm_d, k_rows,
            start, end, qk_scale, cap_scale, q_len, k_len, kt, stride_ql, stride_qd, stride_dol,
            stride_dod, stride_biasm, stride_biasn, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, N_WORDS,
            False, SOFTCAP, HAS_BIAS, BIAS_ROW, DBIAS, PERMUTED, INPUT_PRECISION, TMA)
        start, end = row_range(part_ptr_t, row)
        dk, dv, dbias_cols = _dkdv_tiles(
            dk, dv, dbias_cols, k, v, q_base, do_base, lse_base, delta_base, bias_base,
            bias_col, dbias_base, part_row_t, part_mask_t, masks, QPerm, perm_d, k_rows,
            start, end, qk_scale, cap_scale, q_len, k_len, kt, stride_ql, stride_qd, stride_dol,
            stride_dod, stride_biasm, stride_biasn, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, N_WORDS,
            True, SOFTCAP, HAS_BIAS, BIAS_ROW, DBIAS, PERMUTED, INPUT_PRECISION, TMA)
        if DBIAS == 2:
            tl.store(dbias_base + k_rows, dbias_cols, mask=offs_n < k_len)
    dk *= softmax_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + rows * stride_dkl
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + rows * stride_dvl
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, col_ptr, masks, KPerm, perm_d, start, end,
              qk_scale, cap_scale, bias_rows, row_ok, k_len,
              stride_kl, stride_kd, stride_vl, stride_vd, stride_biasn,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, N_WORDS: tl.constexpr, HEADS: tl.constexpr,
              IS_PARTIAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
              BIAS_ROW: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              TMA: tl.constexpr):
    """Accumulate dQ of one query tile of ``HEADS`` stacked query heads over the key tiles
    ``col_ptr[start:end]`` (keys where ``token_rows(KPerm, ..., perm_d, PERMUTED)`` puts
    them)."""
    offs_i = tl.arange(0, HEADS * BLOCK_M) % BLOCK_M
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
            # keys no row of the tile attends read as 0: NaN there would survive dS = 0
            keys_used = tile_keys(tile_mask, offs_i, offs_n, N_WORDS)  # [BLOCK_N]
            kv_ok = kv_ok & ((offs_kn < k_len) & keys_used)[:, None]
        k = load_tile(k_base, k_rows, kt * BLOCK_N, k_len, perm_d, stride_kl, stride_kd, kv_ok,
                      BLOCK_N, BLOCK_D, PERMUTED, TMA)  # [BLOCK_N, BLOCK_D]
        if IS_PARTIAL and TMA:  # a TMA box has no mask
            k = tl.where(keys_used[:, None], k, 0.0)
        v = load_tile(v_base, k_rows, kt * BLOCK_N, k_len, perm_d, stride_vl, stride_vd, kv_ok,
                      BLOCK_N, BLOCK_D, PERMUTED, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
        s, tanh = log2_scores(qk, qk_scale, cap_scale, SOFTCAP)
        if HAS_BIAS:  # natural units (``score_args``)
            s += load_bias(bias_rows, k_rows, row_ok, offs_kn < k_len, stride_biasn, IS_PARTIAL,
                           BIAS_ROW)
            p = tl.math.exp2((s - lse[:, None]) * LOG2E)
        else:
            p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tanh * tanh)
        if IS_PARTIAL:  # inactive pairs: P (and tanh) may be inf or NaN there, dP NaN
            bits = tile_bits(tile_mask, offs_i, offs_n, N_WORDS, False)
            ds = tl.where(bits, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def sparse_attn_bwd_dq_kernel(
    Q, K, V, Bias, Out, DOut, Lse, DLse, Delta, LseK, DQ,
    full_ptr, full_col, part_ptr, part_col, masks, QPerm, KPerm, perm_d,
    qk_scale, cap_scale, softmax_scale, q_len, k_len, num_q_heads, group_size, head_div,
    layout_heads, layout_batch_step, bias_head_div,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_dqb, stride_dql, stride_dqh, stride_dqd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    N_WORDS: tl.constexpr, HEADS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """One program = one query tile of ``HEADS`` consecutive query heads of one batch (sharing
    a KV head and a layout row); grid (num_q_tiles, B * Hq / HEADS). Tensors are in the
    caller's token order (``PERMUTED``: see the forward kernel).

    It also computes what the dK/dV kernel reads per query row, in the layout's token order
    (contiguous per tile): Delta = rowsum(dO * O) - dLse and, with ``PERMUTED``, LseK = Lse.
    Lse, DLse, Delta and LseK are (B, Hq, Lq) float32, contiguous."""
    b, hk, hq0, row, heads, offs_m = query_program(num_q_heads, group_size, head_div,
                                                   layout_heads, layout_batch_step, HEADS, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q_rows = token_rows(QPerm, offs_m, tl.program_id(0).to(tl.int64) * BLOCK_M, q_len, perm_d,
                        PERMUTED)
    rows = q_rows[:, None]
    hs = heads[:, None]
    q = tl.load(Q + b * stride_qb + hs * stride_qh + rows * stride_ql + offs_d[None, :] * stride_qd,
                mask=ok, other=0.0)  # [HEADS * BLOCK_M, BLOCK_D]
    do = tl.load(DOut + b * stride_dob + hs * stride_doh + rows * stride_dol
                 + offs_d[None, :] * stride_dod, mask=ok, other=0.0)
    o = tl.load(Out + b * stride_ob + hs * stride_oh + rows * stride_ol
                + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    row_ok = offs_m < q_len
    plane = (b * num_q_heads + heads) * q_len
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + plane + q_rows, mask=row_ok, other=0.0)
    lse = tl.load(Lse + plane + q_rows, mask=row_ok, other=0.0)
    tl.store(Delta + plane + offs_m, delta, mask=row_ok)
    if PERMUTED:
        tl.store(LseK + plane + offs_m, lse, mask=row_ok)
    if HAS_BIAS:
        # natural units; a row whose every key is at -inf (lse = -inf) gets P = 0, not NaN
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
    else:
        lse *= LOG2E
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    k_base = tile_source(k_base, k_len, stride_kl, perm_d, BLOCK_N, HEAD_DIM, BLOCK_D, PERMUTED,
                         TMA)
    v_base = tile_source(v_base, k_len, stride_vl, perm_d, BLOCK_N, HEAD_DIM, BLOCK_D, PERMUTED,
                         TMA)
    bias_rows = bias_rows_of(Bias, b, hq0, heads, q_rows, bias_head_div, stride_biasb,
                             stride_biash, stride_biasm, BIAS_ROW)
    dq = tl.zeros([HEADS * BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, end = row_range(full_ptr, row)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, full_col, masks, KPerm, perm_d,
                   start, end, qk_scale, cap_scale, bias_rows, row_ok, k_len,
                   stride_kl, stride_kd, stride_vl, stride_vd, stride_biasn,
                   HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, N_WORDS, HEADS, False, SOFTCAP,
                   HAS_BIAS, BIAS_ROW, PERMUTED, INPUT_PRECISION, TMA)
    start, end = row_range(part_ptr, row)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, part_col, masks, KPerm, perm_d,
                   start, end, qk_scale, cap_scale, bias_rows, row_ok, k_len,
                   stride_kl, stride_kd, stride_vl, stride_vd, stride_biasn,
                   HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, N_WORDS, HEADS, True, SOFTCAP,
                   HAS_BIAS, BIAS_ROW, PERMUTED, INPUT_PRECISION, TMA)
    dq *= softmax_scale
    tl.store(DQ + b * stride_dqb + hs * stride_dqh + rows * stride_dql
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=ok)


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
    perm = perm_args(layout, q)
    lse_k = new_empty(like=lse) if perm["PERMUTED"] else lse  # lse in the layout's token order
    common = launch_args(q, k, layout)
    scores = score_args(softmax_scale, softcap, natural=bias is not None)
    dbias_mode, dbias_buf = 0, dq  # dq: a placeholder pointer when no dbias is computed
    if bias is not None and bias_grad:
        dbias_mode = 2 if bias.shape[2] == 1 and q_len > 1 else 1
        shape = (batch, num_q_heads) + ((k_len,) if dbias_mode == 2 else (q_len, k_len))
        dbias_buf = torch.zeros(shape, dtype=torch.float32, device=q.device)
    q_grid = (layout.num_q_tiles, batch * num_q_heads)
    if q_grid[0] * q_grid[1]:
        heads = launch_config.heads_per_program(layout.block_m, common["group_size"],
                                                common["head_div"], kernel="dq")
        sparse_attn_bwd_dq_kernel[(q_grid[0], q_grid[1] // heads)](
            Q=q, K=k, V=v, Out=out, DOut=do, Lse=lse, DLse=dlse if dlse is not None else delta,
            HAS_DLSE=dlse is not None, Delta=delta, LseK=lse_k, DQ=dq,
            **bias_args(bias, q, heads),
            full_ptr=layout.full_ptr, full_col=layout.full_col, part_ptr=layout.part_ptr,
            part_col=layout.part_col, masks=layout.masks, **perm,
            softmax_scale=softmax_scale, q_len=q_len, k_len=k_len, **scores,
            HEADS=heads, **common, **stride_args(q=q, k=k, v=v, o=out, do=do, dq=dq),
            TMA=use_tma(layout, k, v),
            **launch_config.get_bwd_config(head_dim, heads * layout.block_m, layout.block_n,
                                           kernel="dq"))
    kv_grid = (layout.num_k_tiles, batch * k.shape[2])
    if kv_grid[0] * kv_grid[1]:
        sparse_attn_bwd_dkdv_kernel[kv_grid](
            Q=q, K=k, V=v, DOut=do, Lse=lse_k, Delta=delta, DK=dk, DV=dv, **bias_args(bias, q),
            DBias=dbias_buf, DBIAS=dbias_mode,
            full_ptr_t=layout.full_ptr_t, full_row_t=layout.full_row_t,
            part_ptr_t=layout.part_ptr_t, part_row_t=layout.part_row_t,
            part_mask_t=layout.part_mask_t, masks=layout.masks, **perm,
            softmax_scale=softmax_scale, q_len=q_len, k_len=k_len, **scores,
            **common, **stride_args(q=q, k=k, v=v, do=do, dk=dk, dv=dv),
            TMA=use_tma(layout, q, do),
            **launch_config.get_bwd_config(head_dim, layout.block_m, layout.block_n,
                                           kernel="dkdv"))
    dbias = None
    if dbias_mode:
        dbias = _reduce_to(dbias_buf if dbias_mode == 1 else dbias_buf[:, :, None], bias)
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
