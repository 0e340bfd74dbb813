"""Pieces shared by the forward and backward kernels."""

import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from . import config as launch_config

# kernels may only read globals that are constexpr; host code uses ``LOG2E.value``
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tests set this to fill every fresh output buffer with NaN, so a tile a kernel forgot to write
# fails loudly instead of passing on stale zeros.
POISON_OUTPUTS = False


def new_empty(*args, like=None, **kwargs) -> torch.Tensor:
    """``torch.empty`` (or ``empty_like(like)``, always contiguous), NaN-filled under
    ``POISON_OUTPUTS``."""
    if like is not None:
        t = torch.empty_like(like, memory_format=torch.contiguous_format)
    else:
        t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


@triton.jit
def tile_bits(mask_ptr, offs_q, offs_k, N_WORDS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Decode one partial tile's bitmask at query rows ``offs_q`` and key columns ``offs_k``.

    ``mask_ptr`` points at the tile's ``[block_m, N_WORDS]`` int32 words (offsets are within the
    tile). Returns bool ``[len(offs_q), len(offs_k)]``, or its transpose if ``TRANSPOSED``.
    """
    word_of_k = offs_k // 32
    shift = offs_k % 32
    if TRANSPOSED:
        bits = tl.zeros([offs_k.shape[0], offs_q.shape[0]], dtype=tl.int32)
    else:
        bits = tl.zeros([offs_q.shape[0], offs_k.shape[0]], dtype=tl.int32)
    for w in tl.static_range(N_WORDS):
        word = tl.load(mask_ptr + offs_q * N_WORDS + w)  # [Q]
        if TRANSPOSED:
            bit = (word[None, :] >> shift[:, None]) & 1  # [K, Q]
            bits = tl.where((word_of_k == w)[:, None], bit, bits)
        else:
            bit = (word[:, None] >> shift[None, :]) & 1  # [Q, K]
            bits = tl.where((word_of_k == w)[None, :], bit, bits)
    return bits != 0


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def tile_keys(mask_ptr, offs_q, offs_k, N_WORDS: tl.constexpr):
    """Which key columns ``offs_k`` of one partial tile (see ``tile_bits``) at least one of the
    query rows ``offs_q`` attends: bool ``[len(offs_k)]``. The other keys may hold garbage
    (NaN in unused cache rows) that must not reach a dot product, even times P = 0."""
    word_of_k = offs_k // 32
    shift = offs_k % 32
    used = tl.zeros([offs_k.shape[0]], dtype=tl.int32)
    for w in tl.static_range(N_WORDS):
        word = tl.reduce(tl.load(mask_ptr + offs_q * N_WORDS + w), 0, _bit_or)  # the OR of rows
        used = tl.where(word_of_k == w, (word >> shift) & 1, used)
    return used != 0


@triton.jit
def tile_queries(mask_ptr, offs_q, N_WORDS: tl.constexpr):
    """Which query rows ``offs_q`` of one partial tile attend at least one of its keys: bool
    ``[len(offs_q)]`` (an empty row's query may hold garbage, kept out of dK as in
    ``tile_keys``)."""
    used = tl.zeros([offs_q.shape[0]], dtype=tl.int32)
    for w in tl.static_range(N_WORDS):
        used |= tl.load(mask_ptr + offs_q * N_WORDS + w)
    return used != 0


def head_args(q, k, pattern) -> dict:
    """Kernel arguments of the head grouping, the pattern's (batch, head) mapping, the padded head
    dim and the dot precision. ``q`` is (B, Lq, Hq, D), ``k`` is (B, Lk, Hkv, D); ``pattern``
    is a ``SparseLayout`` or a ``GatherIndex`` (its ``batch`` and ``heads``)."""
    num_q_heads, head_dim = q.shape[2], q.shape[3]
    return dict(
        num_q_heads=num_q_heads,
        group_size=num_q_heads // k.shape[2],
        head_div=num_q_heads // pattern.heads,
        layout_heads=pattern.heads,
        layout_batch_step=0 if pattern.batch == 1 else 1,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # fp32 inputs get exact fp32 products; tf32 would miss the fp32 accuracy bar
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def launch_args(q, k, layout) -> dict:
    """Kernel arguments shared by every pass of the tile walker: ``head_args`` and the
    layout's tile sizes."""
    return dict(
        **head_args(q, k, layout),
        BLOCK_M=layout.block_m,
        BLOCK_N=layout.block_n,
        N_WORDS=-(-layout.block_n // 32),
    )


def score_args(softmax_scale: float, softcap: float, natural: bool = False) -> dict:
    """How the kernels turn q.k into scores: ``qk * qk_scale``, or with a softcap
    ``qk_scale * tanh(qk * cap_scale)`` (``qk_scale`` = softcap), in log2 units (the scale
    times log2 e), or with ``natural`` in natural units (a bias is added in natural units: a
    huge finite one such as ``finfo.min`` would overflow times log2 e)."""
    unit = 1.0 if natural else LOG2E.value
    if softcap:
        return dict(qk_scale=softcap * unit, cap_scale=softmax_scale / softcap, SOFTCAP=True)
    return dict(qk_scale=softmax_scale * unit, cap_scale=0.0, SOFTCAP=False)


def bias_args(bias, q, heads: int = 1) -> dict:
    """Kernel arguments of an optional additive bias ``(B|1, Hb, Lq|1, Lk)``: size-1 dims get
    stride 0 (broadcast), query head ``h`` reads bias head ``h // bias_head_div``.

    ``BIAS_ROW``: a program of ``heads`` stacked query heads reads a single bias row (the bias
    has one row and the stacked heads share its head), loaded as one vector per key tile."""
    if bias is None:
        return dict(Bias=q, bias_head_div=1, stride_biasb=0, stride_biash=0, stride_biasm=0,
                    stride_biasn=0, HAS_BIAS=False, BIAS_ROW=False)
    strides = [0 if n == 1 else s for n, s in zip(bias.shape, bias.stride())]
    head_div = q.shape[2] // bias.shape[1]
    return dict(Bias=bias, bias_head_div=head_div,
                **{f"stride_bias{axis}": s for axis, s in zip("bhmn", strides)}, HAS_BIAS=True,
                BIAS_ROW=bias.shape[2] == 1 and head_div % heads == 0)


def stride_args(**tensors) -> dict:
    """``stride_<name><axis>`` keyword arguments of (B, L, H, D) tensors, e.g. stride_qh."""
    return {f"stride_{name}{axis}": s for name, t in tensors.items()
            for axis, s in zip("blhd", t.stride())}


@triton.jit
def row_range(ptr, row):
    """``(start, end)`` of CSR row ``row`` as int64 (tile offsets may pass 2**31 in bytes)."""
    return tl.load(ptr + row).to(tl.int64), tl.load(ptr + row + 1).to(tl.int64)


@triton.jit
def query_program(num_q_heads, group_size, head_div, layout_heads, layout_batch_step,
                  HEADS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The rows a query-tile program owns; grid (num_q_tiles, B * Hq / HEADS).

    One query tile of ``HEADS`` consecutive query heads that share a KV head and a layout row.
    Returns the batch ``b``, KV head ``hk`` and first query head ``hq0`` (int64), the layout
    ``row`` of the tile, and for each of the ``HEADS * BLOCK_M`` rows its query head (int64)
    and query position.
    """
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    num_stacks = num_q_heads // HEADS
    b = (bh // num_stacks).to(tl.int64)
    hq0 = ((bh % num_stacks) * HEADS).to(tl.int64)
    hk = hq0 // group_size
    row = (b * layout_batch_step * layout_heads + hq0 // head_div) * tl.num_programs(0) + qt
    offs_r = tl.arange(0, HEADS * BLOCK_M)
    heads = (hq0 + offs_r // BLOCK_M).to(tl.int64)  # [HEADS * BLOCK_M]
    offs_m = qt * BLOCK_M + offs_r % BLOCK_M  # [HEADS * BLOCK_M]
    return b, hk, hq0, row, heads, offs_m


@triton.jit
def log2_scores(qk, qk_scale, cap_scale, SOFTCAP: tl.constexpr):
    """Scores in log2 units (natural units with a bias) from raw q.k products (see
    ``score_args``), and the softcap's
    ``tanh(qk * softmax_scale / softcap)`` that the backward differentiates (``qk`` itself,
    unused, without a softcap). The tanh is ``2 * sigmoid(2x) - 1``: exact at the saturated
    ends, and it runs under the interpreter."""
    if SOFTCAP:
        tanh = 2.0 * tl.sigmoid(2.0 * qk * cap_scale) - 1.0
        scores = tanh * qk_scale
    else:
        tanh = qk
        scores = qk * qk_scale
    return scores, tanh


@triton.jit
def bias_rows_of(Bias, b, hq0, heads, q_rows, bias_head_div, stride_biasb, stride_biash,
                 stride_biasm, BIAS_ROW: tl.constexpr):
    """Where each row of a query program reads its bias (rows ``q_rows`` of query heads
    ``heads``): one pointer per row, or with ``BIAS_ROW`` the single bias row all of them share.
    (One return per jit function: Triton compiles the code after a constexpr-taken return.)"""
    if BIAS_ROW:
        rows = Bias + b * stride_biasb + (hq0 // bias_head_div) * stride_biash
    else:
        rows = (Bias + b * stride_biasb + (heads // bias_head_div) * stride_biash
                + q_rows * stride_biasm)
    return rows


@triton.jit
def load_bias(bias_rows, cols, row_ok, col_ok, stride_biasn, IS_PARTIAL: tl.constexpr,
              BIAS_ROW: tl.constexpr):
    """One tile of the additive bias, fp32 in natural units: ``bias_rows`` (``bias_rows_of``)
    points at each query row's bias row, ``cols`` are the tile's key columns in the bias;
    partial tiles mask rows and keys outside ``row_ok`` / ``col_ok`` (full tiles lie inside
    both). With ``BIAS_ROW`` one vector is loaded and broadcast over the rows."""
    if BIAS_ROW:
        ptrs = bias_rows + cols * stride_biasn
        ok = col_ok
    else:
        ptrs = bias_rows[:, None] + cols[None, :] * stride_biasn
        ok = row_ok[:, None] & col_ok[None, :]
    if IS_PARTIAL:
        bias = tl.load(ptrs, mask=ok, other=0.0)
    else:
        bias = tl.load(ptrs)
    if BIAS_ROW:
        bias = bias[None, :]
    return bias.to(tl.float32)


@triton.jit
def token_rows(perm, offs, start, n, perm_d, PERMUTED: tl.constexpr):
    """Where the kernel-order tokens ``offs`` (one tile, first token ``start``) of a sequence of
    ``n`` live in the caller's tensors (int64). ``PERMUTED``: 0 no permutation (``offs``);
    1 ``perm[offs]``; 2 the dilation order ``reorder.dilation_order(n, perm_d)``, computed
    rather than read: residue groups of ``n / perm_d`` tokens, a multiple of the tile size, so
    the tile lies in group ``g = start // (n / perm_d)`` and its rows are ``g + (start - g * n /
    perm_d + i) * perm_d`` (one scalar int32 division per tile, none per row).
    Positions >= ``n`` are masked by the caller (they map to row 0 with 1)."""
    if PERMUTED == 1:
        rows = tl.load(perm + offs, mask=offs < n, other=0).to(tl.int64)
    elif PERMUTED == 2:
        group_len = n // perm_d
        group = (start.to(tl.int32) // group_len).to(tl.int64)
        rows = group + (start - group * group_len + (offs - start)) * perm_d
    else:
        rows = offs.to(tl.int64)
    return rows


@triton.jit
def tile_source(base, n, stride_l, perm_d, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, PERMUTED: tl.constexpr, TMA: tl.constexpr):
    """What ``load_tile`` reads ``BLOCK``-row tiles of one (batch, head) plane of a (B, L, H, D)
    tensor through (``base`` points at its row 0, ``n`` rows ``stride_l`` apart): ``base``
    itself, or with ``TMA`` a descriptor for the TMA unit, rows past ``n`` and columns past
    ``HEAD_DIM`` reading as zeros. In the dilation order (``PERMUTED`` 2) it sees the plane as
    ``[n / perm_d, perm_d, D]``, so the tile of one residue group is one box."""
    if TMA:
        if PERMUTED == 2:
            src = tl.make_tensor_descriptor(base, shape=[n // perm_d, perm_d, HEAD_DIM],
                                            strides=[stride_l * perm_d, stride_l, 1],
                                            block_shape=[BLOCK, 1, BLOCK_D])
        else:
            src = tl.make_tensor_descriptor(base, shape=[n, HEAD_DIM], strides=[stride_l, 1],
                                            block_shape=[BLOCK, BLOCK_D])
    else:
        src = base
    return src


@triton.jit
def load_tile(src, rows, start, n, perm_d, stride_l, stride_d, ok, BLOCK: tl.constexpr,
              BLOCK_D: tl.constexpr, PERMUTED: tl.constexpr, TMA: tl.constexpr):
    """The ``[BLOCK, BLOCK_D]`` tile of kernel-order rows ``start ...`` from ``src``
    (``tile_source``): one TMA box, or the caller's rows ``rows`` (``token_rows``) with pointer
    loads, zero where ``ok`` is false."""
    if TMA:
        if PERMUTED == 2:
            group_len = n // perm_d
            group = start.to(tl.int32) // group_len
            tile = src.load([start.to(tl.int32) - group * group_len, group, 0])
            tile = tile.reshape(BLOCK, BLOCK_D)
        else:
            tile = src.load([start.to(tl.int32), 0])
    else:
        offs_d = tl.arange(0, BLOCK_D)
        tile = tl.load(src + rows[:, None] * stride_l + offs_d[None, :] * stride_d, mask=ok,
                       other=0.0)
    return tile


def perm_args(layout, q) -> dict:
    """Kernel arguments of a reordered layout: the kernels read and write the caller's tensors
    through ``q_perm`` / ``k_perm`` (no gathered copies), or compute a dilation order
    (``layout.perm_dilation``) instead of reading it."""
    if layout.q_perm is None:
        return dict(QPerm=q, KPerm=q, perm_d=1, PERMUTED=0)
    if layout.perm_dilation:
        return dict(QPerm=q, KPerm=q, perm_d=layout.perm_dilation, PERMUTED=2)
    return dict(QPerm=layout.q_perm, KPerm=layout.k_perm, perm_d=1, PERMUTED=1)


def use_tma(layout, *tensors) -> bool:
    """Whether the kernels read ``tensors`` (B, L, H, D) by tiles through TMA descriptors
    (``config.TMA``): on CUDA or under the interpreter, in token order or a computed dilation
    order (``config.TMA_DILATION``), with a contiguous head dim and 16-byte aligned rows.
    On CUDA it sets Triton's scratch allocator (where kernels write their descriptors, on the
    current device like the launch) if none is set."""
    if not launch_config.TMA or (layout.q_perm is not None and not (
            layout.perm_dilation and launch_config.TMA_DILATION)):
        return False
    if not _runs_tma(tensors[0]):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:3]):
            return False
    if tensors[0].is_cuda and isinstance(_allocation._allocator.get(),
                                         _allocation.NullAllocator):
        triton.set_allocator(lambda n, align, stream: torch.empty(n, dtype=torch.int8,
                                                                  device="cuda"))
    return True


def _runs_tma(t: torch.Tensor) -> bool:
    """Whether kernels on ``t`` can read through TMA descriptors: a CUDA GPU with a TMA unit
    (sm_90 and later), or the CPU interpreter, which emulates them."""
    if t.is_cuda:
        return torch.cuda.get_device_capability(t.device)[0] >= 9
    return os.environ.get("TRITON_INTERPRET") == "1"
