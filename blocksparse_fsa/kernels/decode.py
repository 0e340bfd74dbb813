"""Split-KV (flash-decoding) attention over a KV cache: a window + sinks evaluated from positions,
or per-query lists of cache positions; contiguous or paged caches.

Each program folds one slice of a query block's keys into a partial ``(out, lse)``; the slices
are merged in split order, so results do not depend on scheduling: by a second kernel, or
(``config.DECODE_MERGE = "ticket"``) by the last program of the block to finish, which knows it
is last from a ticket it takes from an atomic counter (one launch per step). Grid sizes and
buffers depend on shapes only (never on ``cache_seqlens``), so a decode step captures in a
CUDA graph. The same kernel serves chunked prefill: a window block of query rows walks the
union of their windows, an index list is walked row by row (the gather kernels' strategy).
"""

import torch
import triton
import triton.language as tl

from . import config
from .common import LN2, cdiv, dim_args, log2_scores, new_empty, next_pow2, score_args

# pattern modes (constexpr)
WINDOW = tl.constexpr(0)
INDICES = tl.constexpr(1)


@triton.jit
def _key_rows(pos, ok, b, BlockTable, stride_bt_b, stride_kb, stride_kl, PAGE_SIZE: tl.constexpr,
              PAGED: tl.constexpr):
    """Element offsets of cache positions ``pos`` of batch ``b`` (int64, [BLOCK_N]): through the
    block table's page of each position, or ``b``'s own rows of a contiguous cache."""
    if PAGED:
        page = tl.load(BlockTable + b * stride_bt_b + pos // PAGE_SIZE, mask=ok, other=0)
        rows = page.to(tl.int64) * stride_kb + (pos % PAGE_SIZE) * stride_kl
    else:
        rows = b * stride_kb + pos * stride_kl
    return rows


@triton.jit
def _block_rows(q_len, num_kv_heads, group_size, BLOCK_M: tl.constexpr,
                GROUP_PAD: tl.constexpr):
    """The rows of this program's query block (grid axes 1 and 2 of the decode kernels):
    ``BLOCK_M // GROUP_PAD`` query rows x the padded head group of KV head ``hk`` of batch
    ``b``. Returns ``(b, hk, qi, row_ok, rows_q, rows_l, split_rows)``: ``b`` int64, the query
    row of each row, which rows exist, their rows of (B, Lq, Hq) and entries of (B, Hq, Lq)
    (int64), and the rows of (B, Lq, Hq) (int64), a split's stride in the partials."""
    b = (tl.program_id(2) // num_kv_heads).to(tl.int64)
    hk = tl.program_id(2) % num_kv_heads
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    offs_r = tl.arange(0, BLOCK_M)
    qi = tl.program_id(1) * BLOCK_Q + offs_r // GROUP_PAD  # [BLOCK_M] query row of each row
    g = offs_r % GROUP_PAD
    hq = hk * group_size + g
    row_ok = (qi < q_len) & (g < group_size)
    num_q_heads = num_kv_heads * group_size
    rows_q = (b * q_len + qi.to(tl.int64)) * num_q_heads + hq
    rows_l = (b * num_q_heads + hq) * q_len + qi
    split_rows = (b * 0 + tl.num_programs(2) // num_kv_heads) * q_len * num_q_heads
    return b, hk, qi, row_ok, rows_q, rows_l, split_rows


@triton.jit
def decode_fwd_kernel(
    Q, KCache, VCache, CacheSeqlens, BlockTable, Indices, Out, Lse, OutPart, LsePart, Tickets,
    qk_scale, cap_scale, q_len, num_kv_heads, group_size, num_new, left, right, sinks, n_idx,
    stride_k, stride_v, stride_bt_b,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, TICKETS: tl.constexpr,
):
    """One program = split ``program_id(0)`` of the keys of ``BLOCK_M // GROUP_PAD`` query rows
    x the query heads of one KV head (stacked as the matmul's rows, one K/V load serves them);
    grid (NUM_SPLITS, ceil(Lq / rows), B * Hkv). Q (B, Lq, Hq, D) and Indices (B, Hkv, Lq, W)
    contiguous, caches with any strides (``stride_k`` / ``stride_v``: (b, l, h, d)). Writes the
    final out (B, Lq, Hq, D) and lse (B, Hq, Lq, natural log) to contiguous ``Out``/``Lse``.
    With NUM_SPLITS > 1 each program writes its slice's normalised out and lse (log2 units) to
    ``OutPart``/``LsePart`` (NUM_SPLITS, B, Lq, Hq, D) / (NUM_SPLITS, B, Hq, Lq), merged by
    :func:`decode_merge_kernel`, or with ``TICKETS`` by the block's last program: each takes a
    ticket from ``Tickets`` (int32, one per block, zero on entry and again on exit)."""
    split = tl.program_id(0)
    b64, hk, qi, row_ok, rows_q, rows_l, split_rows = _block_rows(
        q_len, num_kv_heads, group_size, BLOCK_M, GROUP_PAD)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + rows_q[:, None] * HEAD_DIM + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    seqlen = tl.load(CacheSeqlens + b64).to(tl.int64) + num_new  # keys after the append
    pos_q = seqlen - q_len + qi  # bottom-right aligned position of each row, [BLOCK_M]
    if MODE == WINDOW:
        last = seqlen - 1
        lo = tl.where(left >= 0, tl.maximum(pos_q - left, 0), 0)  # [BLOCK_M]
        if IS_CAUSAL:
            hi = tl.minimum(pos_q, last)
        else:
            hi = tl.where(right >= 0, tl.minimum(pos_q + right, last), last)
        # the block's keys as one virtual list: the sinks below its lowest window, then the
        # union of its windows (and, without causality, of the sinks above them)
        q_first = tl.program_id(1) * BLOCK_Q
        first = seqlen - q_len + q_first
        final = seqlen - q_len + tl.minimum(q_first + BLOCK_Q, q_len) - 1
        lo_b = tl.where(left >= 0, tl.maximum(first - left, 0), 0)
        if IS_CAUSAL:
            hi_b = tl.minimum(final, last)
        else:
            hi_b = tl.where(right >= 0, tl.minimum(final + right, last), last)
            hi_b = tl.maximum(hi_b, tl.minimum(sinks, seqlen) - 1)
        n_sink = tl.minimum(tl.minimum(sinks, lo_b), seqlen)
        n_keys = n_sink + tl.maximum(hi_b + 1 - lo_b, 0)
    else:
        n_keys = n_idx + 0 * seqlen
        idx_base = Indices + ((b64 * num_kv_heads + hk) * q_len + tl.program_id(1)) * n_idx
    # this split's slice of the virtual key list, a whole number of BLOCK_N
    per_split = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, n_keys)

    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    k_head = KCache + hk.to(tl.int64) * stride_k[2]
    v_head = VCache + hk.to(tl.int64) * stride_v[2]
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs_n
        in_range = t < end
        if MODE == WINDOW:
            pos = tl.where(t < n_sink, t, lo_b + t - n_sink)  # [BLOCK_N]
            sink = pos[None, :] < sinks  # [1, BLOCK_N]
            if IS_CAUSAL:
                sink = sink & (pos[None, :] <= pos_q[:, None])
            hit = (pos[None, :] >= lo[:, None]) & (pos[None, :] <= hi[:, None]) | sink
        else:
            pos = tl.load(idx_base + t, mask=in_range, other=-1).to(tl.int64)
            # sorted lists: an entry equal to its predecessor is a duplicate, counted once
            prev = tl.load(idx_base + t - 1, mask=in_range & (t > 0), other=-1).to(tl.int64)
            in_range = in_range & (pos >= 0) & (pos != prev)
            if IS_CAUSAL:
                hit = pos[None, :] <= pos_q[:, None]
            else:
                hit = row_ok[:, None] & (pos[None, :] >= 0)
        in_range = in_range & (pos < seqlen)
        hit = hit & in_range[None, :] & row_ok[:, None]  # [BLOCK_M, BLOCK_N]
        # keys no row of the block attends are never read: garbage there cannot leak
        used = tl.max(hit.to(tl.int32), 0) > 0
        rows_k = _key_rows(pos, used, b64, BlockTable, stride_bt_b, stride_k[0], stride_k[1],
                           PAGE_SIZE, PAGED)
        rows_v = _key_rows(pos, used, b64, BlockTable, stride_bt_b, stride_v[0], stride_v[1],
                           PAGE_SIZE, PAGED)
        kv_ok = used[:, None] & d_ok[None, :]
        k = tl.load(k_head + rows_k[:, None] + offs_d[None, :] * stride_k[3], mask=kv_ok,
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
        s, _ = log2_scores(s, qk_scale, cap_scale, SOFTCAP)
        s = tl.where(hit, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + rows_v[:, None] + offs_d[None, :] * stride_v[3], mask=kv_ok,
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    o_ok = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(Out + rows_q[:, None] * HEAD_DIM + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=o_ok)
        tl.store(Lse + rows_l, lse * LN2, mask=row_ok)
    else:
        split_first = split * split_rows
        tl.store(OutPart + (split_first + rows_q)[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=o_ok)
        tl.store(LsePart + split_first + rows_l, lse, mask=row_ok)
        if TICKETS:
            # every thread's stores come before the ticket (a barrier, then a release); the
            # merge loads after it (an acquire) and skips L1 (.cg): not coherent across SMs
            tl.debug_barrier()
            block = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
            ticket = tl.atomic_add(Tickets + block, 1, sem="acq_rel", scope="gpu")
            if ticket == NUM_SPLITS - 1:
                _merge_splits(Out, Lse, OutPart, LsePart, rows_q, rows_l, row_ok, o_ok, offs_d,
                              split_rows, HEAD_DIM, BLOCK_M, BLOCK_D, NUM_SPLITS)
                tl.atomic_xchg(Tickets + block, 0, sem="relaxed", scope="gpu")  # next step's


@triton.jit
def decode_merge_kernel(Out, Lse, OutPart, LsePart, q_len, num_kv_heads, group_size,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        GROUP_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Merge the partials :func:`decode_fwd_kernel` wrote, one program per query block (grid
    (1, ceil(Lq / rows), B * Hkv), the split kernel's without its splits)."""
    _, _, _, row_ok, rows_q, rows_l, split_rows = _block_rows(
        q_len, num_kv_heads, group_size, BLOCK_M, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    o_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    _merge_splits(Out, Lse, OutPart, LsePart, rows_q, rows_l, row_ok, o_ok, offs_d, split_rows,
                  HEAD_DIM, BLOCK_M, BLOCK_D, NUM_SPLITS)


@triton.jit
def _merge_splits(Out, Lse, OutPart, LsePart, rows_q, rows_l, row_ok, o_ok, offs_d, split_rows,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr):
    """Merge the ``NUM_SPLITS`` partial (out, lse) of one query block's rows in split order (the
    same arithmetic whichever program merges); ``split_rows`` (int64) rows of (B, Lq, Hq) per
    split."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part = tl.load(LsePart + s * split_rows + rows_l, mask=row_ok, other=float("-inf"),
                       cache_modifier=".cg")
        m = tl.maximum(m, part)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part = tl.load(LsePart + s * split_rows + rows_l, mask=row_ok, other=float("-inf"),
                       cache_modifier=".cg")
        w = tl.math.exp2(part - m_safe)  # [BLOCK_M]; 0 for an empty split
        o = tl.load(OutPart + (s * split_rows + rows_q)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=o_ok & (w > 0)[:, None], other=0.0, cache_modifier=".cg")
        acc += w[:, None] * o
        denom += w
    empty = denom == 0.0
    d_safe = tl.where(empty, 1.0, denom)
    lse = tl.where(empty, float("-inf"), (m_safe + tl.math.log2(d_safe)) * LN2)
    tl.store(Out + rows_q[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / d_safe[:, None]).to(Out.dtype.element_ty), mask=o_ok)
    tl.store(Lse + rows_l, lse, mask=row_ok)


def get_decode_config(head_dim: int, indices: bool) -> dict:
    """Keys per step (``BLOCK_N``), warps and stages of ``decode_fwd_kernel``; replace this
    function (``kernels.decode.get_decode_config = mine``) to tune for another GPU. One query
    row's K/V tiles stream through a small matmul: 64 keys keep a D=128 bf16 tile pair at 32 KB.
    A window streams contiguous keys best in 32-key steps three stages deep, index lists (a
    gather per key) in 64-key steps two deep: measured on an H100 (see benchmarks/NOTES.md)."""
    if head_dim <= 128:
        if not indices:
            return dict(BLOCK_N=32, num_warps=4, num_stages=3)
        return dict(BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_N=32, num_warps=8, num_stages=2)


def decode_blocks(q_len: int, group_size: int, indices: bool) -> tuple[int, int]:
    """``(BLOCK_M, GROUP_PAD)``: the rows one program stacks (query rows x the padded head
    group, at least 16 for the matmul) and the padded group. Index lists differ per query
    row, so a program then holds one row."""
    group_pad = next_pow2(group_size)
    if indices:
        return max(16, group_pad), max(16, group_pad)
    rows = min(next_pow2(q_len), max(1, 64 // group_pad))
    return max(16, rows * group_pad), group_pad


# programs per SM that the split count aims at (override to tune; see bench_decode --sweep)
SPLIT_WAVES = 2


def num_splits_for(programs: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """How many slices the keys of one program are cut into: enough programs to fill the GPU
    ``SPLIT_WAVES`` times, never a slice under two key blocks. From shapes only (graph
    capture)."""
    if device.type == "cuda":
        target = SPLIT_WAVES * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: a few slices, so that the merge is exercised
    by_keys = max(1, -(-max_keys // (2 * block_n)))
    return max(1, min(-(-target // max(programs, 1)), by_keys, 64))


def decode_fwd(q, k_cache, v_cache, cache_seqlens, *, block_table=None, attn_indices=None,
               num_new=0, window_size=(-1, -1), sinks=0, is_causal=True, softmax_scale,
               softcap=0.0, num_splits=None):
    """Launch the split-KV kernel and the merge of its splits. ``q`` (B, Lq, Hq, D); caches
    (B, L_max, Hkv, D) or paged (num_blocks, page, Hkv, D) with ``block_table`` (B, pages)
    int32; ``cache_seqlens`` (B,) int32 (the rows' lengths before ``num_new`` appended keys);
    ``attn_indices`` (B|1, Hkv|1, Lq, W) in any order; ``num_splits``: None = from shapes
    (``num_splits_for``). Returns out (B, Lq, Hq, D) like q and lse (B, Hq, Lq) float32."""
    batch, q_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = new_empty(like=q)
    lse = new_empty(batch, num_q_heads, q_len, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    block_m, group_pad = decode_blocks(q_len, group, attn_indices is not None)
    block_q = block_m // group_pad
    launch = get_decode_config(head_dim, attn_indices is not None)
    block_n = launch["BLOCK_N"]
    left, right = window_size
    # the kernel reads these as contiguous arrays (a copy only for strided views)
    cache_seqlens = cache_seqlens.contiguous()
    if paged:
        block_table = block_table.contiguous()
    if attn_indices is not None:  # sorted, so that a duplicate sits next to its twin
        n_idx = attn_indices.shape[-1]
        if attn_indices.dtype == torch.int64:  # beyond int32, an entry is past every row
            attn_indices = attn_indices.clamp(-1, 2**31 - 1)
        attn_indices = torch.sort(attn_indices.to(torch.int32).expand(
            batch, num_kv_heads, q_len, n_idx), dim=-1).values.contiguous()
        max_keys = n_idx
    else:
        n_idx = 0
        span = capacity if left < 0 or (right < 0 and not is_causal) else (
            left + block_q + (0 if is_causal else right))
        max_keys = min(capacity, span + sinks)
    grid_rows = cdiv(q_len, block_q)
    programs = grid_rows * batch * num_kv_heads
    splits = num_splits or num_splits_for(programs, max_keys, block_n, q.device)
    part = part_lse = tickets = None
    tickets_on = config.DECODE_MERGE == "ticket"
    if config.DECODE_MERGE not in ("kernel", "ticket"):
        raise ValueError(f"kernels.config.DECODE_MERGE must be 'kernel' or 'ticket', got "
                         f"{config.DECODE_MERGE!r}")
    if splits > 1:
        part = new_empty(splits, batch, q_len, num_q_heads, head_dim, dtype=torch.float32,
                         device=q.device)
        part_lse = new_empty(splits, batch, num_q_heads, q_len, dtype=torch.float32,
                             device=q.device)
        if tickets_on:  # zeroed per call, not kept: a shared counter would mix two streams
            tickets = torch.zeros(grid_rows * batch * num_kv_heads, dtype=torch.int32,
                                  device=q.device)
    dims = dim_args(q)
    blocks = dict(BLOCK_M=block_m, GROUP_PAD=group_pad, NUM_SPLITS=splits)
    decode_fwd_kernel[(splits, grid_rows, batch * num_kv_heads)](
        Q=q.contiguous(), KCache=k_cache, VCache=v_cache, CacheSeqlens=cache_seqlens,
        BlockTable=block_table, Indices=attn_indices, Out=out, Lse=lse, OutPart=part,
        LsePart=part_lse, Tickets=tickets, **score_args(softmax_scale, softcap),
        q_len=q_len, num_kv_heads=num_kv_heads, group_size=group, num_new=num_new,
        left=left, right=right, sinks=sinks, n_idx=n_idx, stride_k=k_cache.stride(),
        stride_v=v_cache.stride(), stride_bt_b=block_table.stride(0) if paged else 0,
        **dims, **blocks, PAGE_SIZE=k_cache.shape[1] if paged else 1, PAGED=paged,
        MODE=(INDICES if attn_indices is not None else WINDOW).value, IS_CAUSAL=bool(is_causal),
        TICKETS=tickets_on, **launch,
    )
    if splits > 1 and not tickets_on:
        decode_merge_kernel[(1, grid_rows, batch * num_kv_heads)](
            Out=out, Lse=lse, OutPart=part, LsePart=part_lse, q_len=q_len,
            num_kv_heads=num_kv_heads, group_size=group, HEAD_DIM=head_dim,
            BLOCK_D=dims["BLOCK_D"], **blocks, num_warps=4)
    return out, lse

