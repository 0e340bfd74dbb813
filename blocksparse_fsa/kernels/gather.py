"""Gather kernels: attention over a ``GatherIndex``, each query loading its own keys.

For scattered token-level patterns, where the tile walker touches nearly every tile at a few
percent density. The query heads of a GQA group that share a pattern row form the dot's rows
(padded to 16), so one gathered K/V row serves all of them. The backward computes dQ the same
way and dK/dV per key over the transposed lists (the queries that chose the key): every output
element is written by exactly one program, so it is deterministic and needs no atomics.
"""

import math

import torch
import triton
import triton.language as tl

from ..layout.core import GatherIndex
from . import config as launch_config
from .common import (LN2, LOG2E, cdiv, dim_args, head_map, log2_scores, new_empty, next_pow2,
                     row_range, score_args)


@triton.jit
def _stacked_heads(heads, HEADS: tl.constexpr, ROWS: tl.constexpr):
    """Program axis 1 -> the batch ``b``, KV head ``hk`` and pattern group (int64) of a stack of
    ``HEADS`` consecutive query heads sharing both (``heads``: see ``head_map``), and each of
    the ``ROWS`` dot rows' query head (rows >= ``HEADS`` are padding: ``head_ok`` False, head
    clamped to the first)."""
    num_q_heads, group_size, head_div, layout_heads, layout_batch_step = heads
    bh = tl.program_id(1)
    num_stacks = num_q_heads // HEADS
    b = (bh // num_stacks).to(tl.int64)
    hq0 = (bh % num_stacks) * HEADS
    hk = (hq0 // group_size).to(tl.int64)
    group = b * layout_batch_step * layout_heads + hq0 // head_div
    offs_r = tl.arange(0, ROWS)
    head_ok = offs_r < HEADS
    row_heads = (hq0 + tl.where(head_ok, offs_r, 0)).to(tl.int64)  # [ROWS]
    return b, hk, group, row_heads, head_ok


@triton.jit
def _token_rows(ptr, strides, b, i, row_heads, offs_d, mask):
    """Query ``i`` of batch ``b`` of a (B, L, H, D) tensor at heads ``row_heads``:
    ``[ROWS, BLOCK_D]``, 0 where masked."""
    return tl.load(ptr + b * strides[0] + i * strides[1] + row_heads[:, None] * strides[2]
                   + offs_d[None, :] * strides[3], mask=mask, other=0.0)


@triton.jit
def _gather_kv(base, keys, key_ok, offs_d, d_ok, stride_l, stride_d):
    """Rows ``keys`` of one (batch, KV head) of k or v: ``[BLOCK_N, BLOCK_D]``, 0 where masked."""
    return tl.load(base + keys[:, None] * stride_l + offs_d[None, :] * stride_d,
                   mask=key_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def gather_attn_fwd_kernel(
    Q, K, V, Out, Lse, row_ptr, col,
    stride_q, stride_k, stride_v, stride_o,
    heads, q_len, qk_scale, cap_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
    ROWS: tl.constexpr, SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program = one query ``i`` of ``HEADS`` query heads sharing a KV head and a pattern
    row (the dot's rows, padded to ``ROWS``); it walks the row's keys ``BLOCK_N`` at a time with
    an online softmax in exp2. Grid (Lq, B * Hq / HEADS). q/k/v/out (B, L, H, D), any strides;
    lse (B, Hq, Lq) float32, contiguous, natural log. A row with no key gets out = 0 and
    lse = -inf. Only the listed keys are read: garbage in the others never reaches a dot."""
    i = tl.program_id(0).to(tl.int64)
    b, hk, group, row_heads, head_ok = _stacked_heads(heads, HEADS=HEADS, ROWS=ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_mask = head_ok[:, None] & d_ok[None, :]
    q = _token_rows(Q, stride_q, b, i, row_heads, offs_d, row_mask)  # [ROWS, BLOCK_D]
    k_base = K + b * stride_k[0] + hk * stride_k[2]
    v_base = V + b * stride_v[0] + hk * stride_v[2]

    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    start, end = row_range(row_ptr, group * q_len + i)
    for chunk in range(start, end, BLOCK_N):
        slot = chunk + offs_n
        key_ok = slot < end
        keys = tl.load(col + slot, mask=key_ok, other=0).to(tl.int64)  # [BLOCK_N]
        k = _gather_kv(k_base, keys, key_ok, offs_d, d_ok, stride_k[1], stride_k[3])
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [ROWS, BLOCK_N]
        s, _ = log2_scores(qk, qk_scale, cap_scale, SOFTCAP=SOFTCAP)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        # every chunk has a key, so m_new is finite and the first alpha is exp2(-inf) = 0
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])  # [ROWS, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _gather_kv(v_base, keys, key_ok, offs_d, d_ok, stride_v[1], stride_v[3])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(Out + b * stride_o[0] + i * stride_o[1] + row_heads[:, None] * stride_o[2]
             + offs_d[None, :] * stride_o[3], out.to(Out.dtype.element_ty), mask=row_mask)
    num_q_heads = heads[0]
    tl.store(Lse + (b * num_q_heads + row_heads) * q_len + i, lse, mask=head_ok)


@triton.jit
def gather_attn_bwd_preprocess(
    Out, DOut, DLse, Delta, stride_o, stride_do, q_len, num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLse (``DLse``: ``None`` for 0) for one query tile of one
    (batch, head); grid (cdiv(Lq, BLOCK_M), B * Hq). Delta and DLse are (B, Hq, Lq) float32,
    contiguous."""
    qt = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_q_heads
    h = bh % num_q_heads
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + b * stride_o[0] + h * stride_o[2] + rows * stride_o[1]
                + offs_d[None, :] * stride_o[3], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_do[0] + h * stride_do[2] + rows * stride_do[1]
                 + offs_d[None, :] * stride_do[3], mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)  # [BLOCK_M]
    if DLse is not None:
        delta -= tl.load(DLse + bh * q_len + offs_m, mask=offs_m < q_len, other=0.0)
    tl.store(Delta + bh * q_len + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def gather_attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, row_ptr, col,
    stride_q, stride_k, stride_v, stride_do, stride_dq,
    heads, q_len, qk_scale, cap_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
    ROWS: tl.constexpr, SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program = dQ of one query ``i`` of ``HEADS`` stacked query heads, over the row's
    keys ``BLOCK_N`` at a time (P recomputed from lse); grid (Lq, B * Hq / HEADS). Lse and
    Delta are (B, Hq, Lq) float32, contiguous."""
    i = tl.program_id(0).to(tl.int64)
    b, hk, group, row_heads, head_ok = _stacked_heads(heads, HEADS=HEADS, ROWS=ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_mask = head_ok[:, None] & d_ok[None, :]
    q = _token_rows(Q, stride_q, b, i, row_heads, offs_d, row_mask)  # [ROWS, BLOCK_D]
    do = _token_rows(DOut, stride_do, b, i, row_heads, offs_d, row_mask)  # [ROWS, BLOCK_D]
    num_q_heads = heads[0]
    stat = (b * num_q_heads + row_heads) * q_len + i  # [ROWS] lse / delta offsets
    lse = tl.load(Lse + stat, mask=head_ok, other=0.0) * LOG2E
    delta = tl.load(Delta + stat, mask=head_ok, other=0.0)
    k_base = K + b * stride_k[0] + hk * stride_k[2]
    v_base = V + b * stride_v[0] + hk * stride_v[2]

    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    start, end = row_range(row_ptr, group * q_len + i)
    for chunk in range(start, end, BLOCK_N):
        slot = chunk + offs_n
        key_ok = slot < end
        keys = tl.load(col + slot, mask=key_ok, other=0).to(tl.int64)  # [BLOCK_N]
        k = _gather_kv(k_base, keys, key_ok, offs_d, d_ok, stride_k[1], stride_k[3])
        v = _gather_kv(v_base, keys, key_ok, offs_d, d_ok, stride_v[1], stride_v[3])
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [ROWS, BLOCK_N]
        s, tanh = log2_scores(qk, qk_scale, cap_scale, SOFTCAP=SOFTCAP)
        p = tl.where(key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # [ROWS, BLOCK_N]
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # through softcap * tanh(s / softcap)
            ds = ds * (1.0 - tanh * tanh)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    dq *= softmax_scale
    tl.store(DQ + b * stride_dq[0] + i * stride_dq[1] + row_heads[:, None] * stride_dq[2]
             + offs_d[None, :] * stride_dq[3], dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def gather_attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, row_ptr_t, row_t,
    stride_q, stride_k, stride_v, stride_do, stride_dk, stride_dv,
    heads, q_len, k_len, qk_scale, cap_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, HEADS: tl.constexpr,
    HEADS_P: tl.constexpr, SPLIT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program = dK, dV of one key ``j`` of one (batch, KV head) from 1/``SPLIT`` of its
    query heads; grid (Lk, B * Hkv * SPLIT). For each stack of ``HEADS`` of those heads that
    share a pattern row, it walks the queries that chose ``j`` (transposed lists), ``BLOCK_Q``
    queries x ``HEADS_P`` (``HEADS`` padded) heads per step, recomputing P from lse. One key
    column makes these matrix-vector products: fp32 elementwise work, reduced over the rows
    once at the end (fixed order). DK/DV are (B, Lk, Hkv, D), or with ``SPLIT`` > 1 fp32
    partial sums (SPLIT, B, Lk, Hkv, D) that the launcher adds up in a fixed order
    (``stride_dk``, ``stride_dv``: the split's stride, then the (B, L, H, D) ones)."""
    num_q_heads, group_size, head_div, layout_heads, layout_batch_step = heads
    j = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    split = bh % SPLIT
    num_kv_heads = num_q_heads // group_size
    b = (bh // SPLIT // num_kv_heads).to(tl.int64)
    hk = (bh // SPLIT % num_kv_heads).to(tl.int64)
    heads_per_split = group_size // SPLIT
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = tl.load(K + b * stride_k[0] + j * stride_k[1] + hk * stride_k[2] + offs_d * stride_k[3],
                mask=d_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
    v = tl.load(V + b * stride_v[0] + j * stride_v[1] + hk * stride_v[2] + offs_d * stride_v[3],
                mask=d_ok, other=0.0).to(tl.float32)
    offs_r = tl.arange(0, BLOCK_Q * HEADS_P)
    r_q = offs_r // HEADS_P  # query slot of each row within the step
    r_h = offs_r % HEADS_P  # head of each row within the stack
    dk = tl.zeros([BLOCK_Q * HEADS_P, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_Q * HEADS_P, BLOCK_D], dtype=tl.float32)
    for stack in range(heads_per_split // HEADS):
        hq0 = hk * group_size + split * heads_per_split + stack * HEADS
        row_heads = hq0 + tl.where(r_h < HEADS, r_h, 0)  # [BLOCK_Q * HEADS_P] int64
        group = b * layout_batch_step * layout_heads + hq0 // head_div
        start, end = row_range(row_ptr_t, group * k_len + j)
        for chunk in range(start, end, BLOCK_Q):
            slot = chunk + r_q
            ok = (slot < end) & (r_h < HEADS)
            qi = tl.load(row_t + slot, mask=ok, other=0).to(tl.int64)  # [BLOCK_Q * HEADS_P]
            mask = ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * stride_q[0] + qi[:, None] * stride_q[1]
                        + row_heads[:, None] * stride_q[2] + offs_d[None, :] * stride_q[3],
                        mask=mask, other=0.0).to(tl.float32)
            do = tl.load(DOut + b * stride_do[0] + qi[:, None] * stride_do[1]
                         + row_heads[:, None] * stride_do[2] + offs_d[None, :] * stride_do[3],
                         mask=mask, other=0.0).to(tl.float32)  # [BLOCK_Q * HEADS_P, BLOCK_D]
            stat = (b * num_q_heads + row_heads) * q_len + qi
            lse = tl.load(Lse + stat, mask=ok, other=0.0) * LOG2E
            delta = tl.load(Delta + stat, mask=ok, other=0.0)
            s, tanh = log2_scores(tl.sum(q * k[None, :], 1), qk_scale, cap_scale,
                                  SOFTCAP=SOFTCAP)
            p = tl.where(ok, tl.math.exp2(s - lse), 0.0)  # [BLOCK_Q * HEADS_P]
            dv += p[:, None] * do
            ds = p * (tl.sum(do * v[None, :], 1) - delta)
            if SOFTCAP:  # through softcap * tanh(s / softcap)
                ds = ds * (1.0 - tanh * tanh)
            dk += ds[:, None] * q
    dk_j = tl.sum(dk, 0) * softmax_scale  # [BLOCK_D]
    dv_j = tl.sum(dv, 0)
    tl.store(DK + split * stride_dk[0] + b * stride_dk[1] + j * stride_dk[2] + hk * stride_dk[3]
             + offs_d * stride_dk[4], dk_j.to(DK.dtype.element_ty), mask=d_ok)
    tl.store(DV + split * stride_dv[0] + b * stride_dv[1] + j * stride_dv[2] + hk * stride_dv[3]
             + offs_d * stride_dv[4], dv_j.to(DV.dtype.element_ty), mask=d_ok)


def _stack(q, k, gidx) -> tuple[tuple, int]:
    """``head_map`` and the number of query heads one program stacks: those sharing a KV
    head and a pattern row, i.e. gcd(group size, query heads per pattern head)."""
    heads = head_map(q, k, gidx)
    return heads, math.gcd(heads[1], heads[2])


def _check(q, k, gidx, bias):
    """The index must describe these lengths, batch and heads, on the inputs' device."""
    if bias is not None:
        raise NotImplementedError("the gather kernels do not support attn_bias; use the tile "
                                  "walker (sparse_attn_fwd / sparse_attn_bwd) for a bias")
    if not isinstance(gidx, GatherIndex):
        raise TypeError(f"gidx must be a GatherIndex, got {type(gidx).__name__}")
    batch, q_len, num_q_heads, _ = q.shape
    if (gidx.q_len, gidx.k_len) != (q_len, k.shape[1]):
        raise ValueError(f"gather index is for q_len={gidx.q_len}, k_len={gidx.k_len} but the "
                         f"inputs have q_len={q_len}, k_len={k.shape[1]}")
    if gidx.batch not in (1, batch):
        raise ValueError(f"gather index has batch {gidx.batch}; expected 1 or {batch}")
    if gidx.heads not in (1, k.shape[2], num_q_heads):
        raise ValueError(f"gather index has {gidx.heads} heads; expected 1, {k.shape[2]} or "
                         f"{num_q_heads}")
    if gidx.device != q.device:
        raise ValueError(f"gather index is on {gidx.device} but query is on {q.device}")


def gather_attn_fwd(q, k, v, gidx, softmax_scale, softcap=0.0, bias=None):
    """Launch the gather forward. ``q`` (B, Lq, Hq, D), ``k``/``v`` (B, Lk, Hkv, D), any
    strides; ``gidx`` a ``GatherIndex`` of these lengths. Returns ``out`` (like q) and ``lse``
    (B, Hq, Lq) float32, natural log, -inf for rows with no key (out 0 there)."""
    _check(q, k, gidx, bias)
    batch, q_len, num_q_heads, head_dim = q.shape
    out = new_empty(like=q)
    lse = new_empty(batch, num_q_heads, q_len, dtype=torch.float32, device=q.device)
    heads, stack = _stack(q, k, gidx)
    grid = (q_len, batch * num_q_heads // stack)
    if grid[0] * grid[1] == 0:
        return out, lse
    gather_attn_fwd_kernel[grid](
        Q=q, K=k, V=v, Out=out, Lse=lse, row_ptr=gidx.row_ptr, col=gidx.col,
        stride_q=q.stride(), stride_k=k.stride(), stride_v=v.stride(), stride_o=out.stride(),
        heads=heads, q_len=q_len, **score_args(softmax_scale, softcap), **dim_args(q),
        HEADS=stack, ROWS=max(16, next_pow2(stack)),
        **launch_config.get_gather_config("fwd", head_dim, stack))
    return out, lse


def gather_attn_bwd(q, k, v, out, lse, dout, gidx, softmax_scale, softcap=0.0, dlse=None,
                    bias=None):
    """Launch the gather backward: delta = rowsum(dO * O) - dlse, dQ per query, dK/dV per
    key (``gather_attn_bwd_dkdv``). ``lse`` (B, Hq, Lq) float32 from ``gather_attn_fwd`` (or
    the tile walker's forward: same layout and units); ``dlse`` its gradient or None.
    Returns ``dq, dk, dv`` like q, k, v; deterministic, no atomics."""
    _check(q, k, gidx, bias)
    if gidx.row_t is None:
        raise ValueError("gather_attn_bwd needs the transposed lists: "
                         "build_gather_index(layout, transposed=True)")
    batch, q_len, num_q_heads, head_dim = q.shape
    dq = new_empty(like=q)
    lse = lse.contiguous()
    delta = new_empty(like=lse)
    heads, stack = _stack(q, k, gidx)
    if q_len and batch * num_q_heads:
        block_m = 64
        gather_attn_bwd_preprocess[(cdiv(q_len, block_m), batch * num_q_heads)](
            Out=out, DOut=dout, DLse=None if dlse is None else dlse.float().contiguous(),
            Delta=delta, stride_o=out.stride(), stride_do=dout.stride(), q_len=q_len,
            num_q_heads=num_q_heads, HEAD_DIM=head_dim, BLOCK_M=block_m,
            BLOCK_D=dim_args(q)["BLOCK_D"])
        gather_attn_bwd_dq_kernel[(q_len, batch * num_q_heads // stack)](
            Q=q, K=k, V=v, DOut=dout, Lse=lse, Delta=delta, DQ=dq, row_ptr=gidx.row_ptr,
            col=gidx.col, stride_q=q.stride(), stride_k=k.stride(), stride_v=v.stride(),
            stride_do=dout.stride(), stride_dq=dq.stride(), heads=heads, q_len=q_len,
            softmax_scale=softmax_scale, **score_args(softmax_scale, softcap), **dim_args(q),
            HEADS=stack, ROWS=max(16, next_pow2(stack)),
            **launch_config.get_gather_config("dq", head_dim, stack))
    dk, dv = gather_attn_bwd_dkdv(q, k, v, dout, lse, delta, gidx, softmax_scale, softcap)
    return dq, dk, dv


def gather_attn_bwd_dkdv(q, k, v, dout, lse, delta, gidx, softmax_scale, softcap=0.0):
    """Launch dK/dV alone (``delta`` = rowsum(dO * O) - dlse, (B, Hq, Lq) float32 contiguous,
    like ``lse``). ``head_split`` > 1 (config) spreads a KV head's query heads over that many
    programs per key, each writing an fp32 partial sum; fewer heads per program means a
    smaller set of q / dO rows in flight (L2 reuse), at the cost of the partial buffers and a
    fixed-order sum (still deterministic)."""
    batch, q_len, _, head_dim = q.shape
    k_len, num_kv_heads = k.shape[1], k.shape[2]
    heads = head_map(q, k, gidx)
    group_size, head_div = heads[1], heads[2]
    cfg = dict(launch_config.get_gather_config("dkdv", head_dim, group_size))
    split = cfg.pop("head_split", 1)
    if split < 1 or group_size % split:
        raise ValueError(f"head_split {split} must divide the group size {group_size}")
    stack = math.gcd(group_size // split, head_div)
    stack_p = next_pow2(stack)
    block_q = max(1, cfg.pop("ROWS") // stack_p)
    if split == 1:
        dk, dv = new_empty(like=k), new_empty(like=v)
        stride_dk, stride_dv = (0, *dk.stride()), (0, *dv.stride())
    else:
        dk, dv = (new_empty(split, *k.shape, dtype=torch.float32, device=k.device)
                  for _ in range(2))
        stride_dk, stride_dv = dk.stride(), dv.stride()
    grid = (k_len, batch * num_kv_heads * split)
    if grid[0] * grid[1]:
        gather_attn_bwd_dkdv_kernel[grid](
            Q=q, K=k, V=v, DOut=dout, Lse=lse, Delta=delta, DK=dk, DV=dv,
            row_ptr_t=gidx.row_ptr_t, row_t=gidx.row_t, stride_q=q.stride(),
            stride_k=k.stride(), stride_v=v.stride(), stride_do=dout.stride(),
            stride_dk=stride_dk, stride_dv=stride_dv, heads=heads, q_len=q_len, k_len=k_len,
            softmax_scale=softmax_scale, **score_args(softmax_scale, softcap),
            HEAD_DIM=head_dim, BLOCK_D=dim_args(q)["BLOCK_D"], BLOCK_Q=block_q, HEADS=stack,
            HEADS_P=stack_p, SPLIT=split, **cfg)
    if split == 1:
        return dk, dv
    return _ordered_sum(dk).to(k.dtype), _ordered_sum(dv).to(v.dtype)


def _ordered_sum(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in that order (bitwise reproducible)."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total
