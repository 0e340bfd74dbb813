"""Pieces shared by the attention kernels: constants, tile decoding, token order, loads, the
prologue of a query-tile program, and the host-side argument helpers.

Tensors of tokens are (B, L, H, D) with any strides, passed as one tuple per tensor
(``stride_q = q.stride()``: batch, sequence, head, head dim); a bias (B|1, H|1, Lq|1, Lk) the
same way, broadcast dims with stride 0. Optional inputs are ``None`` (``if Bias is not None``
is a compile-time branch).
"""

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from . import config as launch_config

# kernels may only read globals that are constexpr; host code uses ``LOG2E.value``
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# ``ORDER``: where the kernels find the tokens of a layout's tiles in the caller's tensors
ORDER_TOKENS = tl.constexpr(0)  # the layout is in the caller's token order
ORDER_TABLE = tl.constexpr(1)  # through the permutation tables ``QPerm`` / ``KPerm``
ORDER_DILATION = tl.constexpr(2)  # through a dilation order, computed (``token_rows``)

# ``DBIAS``: what the dK/dV kernel writes of the bias gradient (with ``DBias`` given)
DBIAS_PAIRS = tl.constexpr(1)  # one value per (query, key): an fp32 (B, Hq, Lq, Lk) buffer
DBIAS_KEYS = tl.constexpr(2)  # summed over the queries (a bias with one row): (B, Hq, Lk)

# ``GUARD``: how a partial tile's operand is read when its unused rows may hold garbage
# (``load_partial``; chosen by ``config.PARTIAL_LOADS``)
GUARD_POINTER = tl.constexpr(0)  # pointer loads, zero at the unused rows
GUARD_SELECT = tl.constexpr(1)  # the TMA box, then a select in registers
GUARD_BRANCH = tl.constexpr(2)  # the TMA box when every row is used, else pointer loads
_GUARDS = {"pointer": GUARD_POINTER, "select": GUARD_SELECT, "branch": GUARD_BRANCH}

_poisoned = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within the block, every fresh output buffer of the kernels starts as garbage (NaN for
    floats; the layout build's integer outputs too), so that a tile a kernel forgot to write
    fails a comparison loudly instead of passing on stale zeros. For tests; nests."""
    global _poisoned
    before, _poisoned = _poisoned, bool(enabled)
    try:
        yield
    finally:
        _poisoned = before


def outputs_poisoned() -> bool:
    """Whether fresh output buffers are being poisoned (``poison_outputs``)."""
    return _poisoned


def new_empty(*args, like=None, **kwargs) -> torch.Tensor:
    """``torch.empty`` (or ``empty_like(like)``, always contiguous), NaN-filled under
    ``poison_outputs``."""
    if like is not None:
        t = torch.empty_like(like, memory_format=torch.contiguous_format)
    else:
        t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if _poisoned else t


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


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host ints (Triton's is a constexpr function whose every call costs
    microseconds, which a launch-bound decode step notices)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host ints (see ``cdiv``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def head_map(q, k, pattern) -> tuple:
    """The ``heads`` kernel argument: ``(num_q_heads, group_size, head_div, layout_heads,
    layout_batch_step)``, how query heads map to KV heads (``group_size`` per KV head) and to
    the pattern's (batch, head) (``head_div`` query heads per pattern head, batch step 0 for a
    broadcast pattern). ``q`` is (B, Lq, Hq, D), ``k`` (B, Lk, Hkv, D); ``pattern`` a
    ``SparseLayout`` or a ``GatherIndex`` (its ``batch`` and ``heads``)."""
    num_q_heads = q.shape[2]
    return (num_q_heads, num_q_heads // k.shape[2], num_q_heads // pattern.heads, pattern.heads,
            0 if pattern.batch == 1 else 1)


def dim_args(q) -> dict:
    """The head dim, its padded block and the dot precision of inputs like ``q``."""
    head_dim = q.shape[3]
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)),
                # fp32 inputs get exact fp32 products; tf32 would miss the fp32 accuracy bar
                INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


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
        return dict(Bias=None, stride_bias=None, bias_head_div=1, BIAS_ROW=False)
    head_div = q.shape[2] // bias.shape[1]
    return dict(Bias=bias, stride_bias=tuple(0 if n == 1 else s
                                             for n, s in zip(bias.shape, bias.stride())),
                bias_head_div=head_div, BIAS_ROW=bias.shape[2] == 1 and head_div % heads == 0)


def perm_args(layout) -> dict:
    """Kernel arguments of the layout's token order (``ORDER``): the kernels read and write
    the caller's tensors through ``q_perm`` / ``k_perm`` (no gathered copies), or compute a
    dilation order (``layout.perm_dilation``) instead of reading it."""
    if layout.q_perm is None:
        return dict(QPerm=None, KPerm=None, perm_d=1, ORDER=ORDER_TOKENS)
    if layout.perm_dilation:
        return dict(QPerm=None, KPerm=None, perm_d=layout.perm_dilation, ORDER=ORDER_DILATION)
    return dict(QPerm=layout.q_perm, KPerm=layout.k_perm, perm_d=1, ORDER=ORDER_TABLE)


@triton.jit
def row_range(ptr, row):
    """``(start, end)`` of CSR row ``row`` as int64 (tile offsets may pass 2**31 in bytes)."""
    return tl.load(ptr + row).to(tl.int64), tl.load(ptr + row + 1).to(tl.int64)


@triton.jit
def head_plane(ptr, strides, b, h):
    """Row 0 of batch ``b``, head ``h`` of a (B, L, H, D) tensor with ``strides``."""
    return ptr + b * strides[0] + h * strides[2]


@triton.jit
def query_program(heads, HEADS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The rows a query-tile program owns; grid (num_q_tiles, B * Hq / HEADS).

    One query tile of ``HEADS`` consecutive query heads that share a KV head and a layout row
    (``heads``: see ``head_map``). Returns the batch ``b``, KV head ``hk`` and first query
    head ``hq0`` (int64), the layout ``row`` of the tile, and for each of the
    ``HEADS * BLOCK_M`` rows its query head (int64) and query position.
    """
    num_q_heads, group_size, head_div, layout_heads, layout_batch_step = heads
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    num_stacks = num_q_heads // HEADS
    b = (bh // num_stacks).to(tl.int64)
    hq0 = ((bh % num_stacks) * HEADS).to(tl.int64)
    hk = hq0 // group_size
    row = (b * layout_batch_step * layout_heads + hq0 // head_div) * tl.num_programs(0) + qt
    offs_r = tl.arange(0, HEADS * BLOCK_M)
    row_heads = (hq0 + offs_r // BLOCK_M).to(tl.int64)  # [HEADS * BLOCK_M]
    offs_m = qt * BLOCK_M + offs_r % BLOCK_M  # [HEADS * BLOCK_M]
    return b, hk, hq0, row, row_heads, offs_m


@triton.jit
def query_tile(Q, K, V, QPerm, stride_q, stride_k, stride_v, heads, q_len, k_len, perm_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HEADS: tl.constexpr, ORDER: tl.constexpr,
               TMA: tl.constexpr):
    """The prologue of a query-tile program (the forward and dQ): which rows it owns
    (``query_program``), where they live in the caller's tensors (``q_rows``,
    ``token_rows``), its query tile ``[HEADS * BLOCK_M, BLOCK_D]`` and what it reads key
    tiles through (``tile_source``). Returns ``b, hk, hq0, row, row_heads, offs_m, q_rows,
    row_ok, q, k_src, v_src`` (``offs_m``: the rows' positions in the layout's order)."""
    b, hk, hq0, row, row_heads, offs_m = query_program(heads, HEADS=HEADS, BLOCK_M=BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q_rows = token_rows(QPerm, offs_m, tl.program_id(0).to(tl.int64) * BLOCK_M, q_len, perm_d,
                        ORDER=ORDER)
    q_ptrs = (Q + b * stride_q[0] + row_heads[:, None] * stride_q[2]
              + q_rows[:, None] * stride_q[1] + offs_d[None, :] * stride_q[3])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                other=0.0)  # [HEADS * BLOCK_M, BLOCK_D]
    k_src = tile_source(head_plane(K, stride_k, b, hk), k_len, stride_k[1], perm_d,
                        BLOCK=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA)
    v_src = tile_source(head_plane(V, stride_v, b, hk), k_len, stride_v[1], perm_d,
                        BLOCK=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=TMA)
    return b, hk, hq0, row, row_heads, offs_m, q_rows, row_ok, q, k_src, v_src


@triton.jit
def log2_scores(qk, qk_scale, cap_scale, SOFTCAP: tl.constexpr):
    """Scores in log2 units (natural units with a bias) from raw q.k products (see
    ``score_args``), and the softcap's ``tanh(qk * softmax_scale / softcap)`` that the
    backward differentiates (``qk`` itself, unused, without a softcap). The tanh is
    ``2 * sigmoid(2x) - 1``: exact at the saturated ends, and it runs under the interpreter."""
    if SOFTCAP:
        tanh = 2.0 * tl.sigmoid(2.0 * qk * cap_scale) - 1.0
        scores = tanh * qk_scale
    else:
        tanh = qk
        scores = qk * qk_scale
    return scores, tanh


@triton.jit
def bias_rows_of(Bias, stride_bias, b, hq0, row_heads, q_rows, bias_head_div,
                 BIAS_ROW: tl.constexpr):
    """Where each row of a query program reads its bias (rows ``q_rows`` of query heads
    ``row_heads``): one pointer per row, or with ``BIAS_ROW`` the single bias row all of them
    share. (One return per jit function: Triton compiles the code after a constexpr-taken
    return.)"""
    if BIAS_ROW:
        rows = Bias + b * stride_bias[0] + (hq0 // bias_head_div) * stride_bias[1]
    else:
        rows = (Bias + b * stride_bias[0] + (row_heads // bias_head_div) * stride_bias[1]
                + q_rows * stride_bias[2])
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
def token_rows(perm, offs, start, n, perm_d, ORDER: tl.constexpr):
    """Where the kernel-order tokens ``offs`` (one tile, first token ``start``) of a sequence of
    ``n`` live in the caller's tensors (int64), by ``ORDER``: ``offs`` themselves; with
    ``ORDER_TABLE`` ``perm[offs]``; with ``ORDER_DILATION`` the dilation order
    ``reorder.dilation_order(n, perm_d)``, computed rather than read: residue groups of
    ``n / perm_d`` tokens, a multiple of the tile size, so the tile lies in group
    ``g = start // (n / perm_d)`` and its rows are ``g + (start - g * n / perm_d + i) * perm_d``
    (one scalar int32 division per tile, none per row).
    Positions >= ``n`` are masked by the caller (they map to row 0 with a table)."""
    if ORDER == ORDER_TABLE:
        rows = tl.load(perm + offs, mask=offs < n, other=0).to(tl.int64)
    elif ORDER == ORDER_DILATION:
        group_len = n // perm_d
        group = (start.to(tl.int32) // group_len).to(tl.int64)
        rows = group + (start - group * group_len + (offs - start)) * perm_d
    else:
        rows = offs.to(tl.int64)
    return rows


@triton.jit
def tile_source(base, n, stride_l, perm_d, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, ORDER: tl.constexpr, TMA: tl.constexpr):
    """What ``load_tile`` reads ``BLOCK``-row tiles of one (batch, head) plane of a (B, L, H, D)
    tensor through (``base`` points at its row 0, ``n`` rows ``stride_l`` apart): ``base``
    itself, or with ``TMA`` a descriptor for the TMA unit, rows past ``n`` and columns past
    ``HEAD_DIM`` reading as zeros. In the dilation order it sees the plane as
    ``[n / perm_d, perm_d, D]``, so the tile of one residue group is one box."""
    if TMA:
        if ORDER == ORDER_DILATION:
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
              BLOCK_D: tl.constexpr, ORDER: tl.constexpr, TMA: tl.constexpr):
    """The ``[BLOCK, BLOCK_D]`` tile of kernel-order rows ``start ...`` from ``src``
    (``tile_source``): one TMA box (no mask: rows past ``n`` read as zeros), or the caller's
    rows ``rows`` (``token_rows``) with pointer loads, zero where ``ok`` is false."""
    if TMA:
        if ORDER == ORDER_DILATION:
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


@triton.jit
def load_partial(src, plane, rows, start, n, perm_d, stride_l, stride_d, ok, used,
                 BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ORDER: tl.constexpr,
                 TMA: tl.constexpr, GUARD: tl.constexpr):
    """``load_tile`` for an operand of a partial tile, with the rows where ``used`` is false
    (no pair of the tile touches them) read as 0: they may hold garbage, and NaN survives a
    zero factor in a dot. ``src`` as in ``load_tile``, ``plane`` the same plane for pointer
    loads; ``GUARD`` picks how (see ``GUARD_POINTER``, ``GUARD_SELECT``, ``GUARD_BRANCH``)."""
    if TMA and GUARD == GUARD_SELECT:
        tile = load_tile(src, rows, start, n, perm_d, stride_l, stride_d, ok, BLOCK=BLOCK,
                         BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=True)
        tile = tl.where(used[:, None], tile, tl.zeros_like(tile))
    elif TMA and GUARD == GUARD_BRANCH:
        # most partial tiles (a diagonal, a window's edge) use every row: one box for those
        if tl.min(used.to(tl.int32), 0) == 1:
            tile = load_tile(src, rows, start, n, perm_d, stride_l, stride_d, ok, BLOCK=BLOCK,
                             BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=True)
        else:
            tile = load_tile(plane, rows, start, n, perm_d, stride_l, stride_d,
                             ok & used[:, None], BLOCK=BLOCK, BLOCK_D=BLOCK_D, ORDER=ORDER,
                             TMA=False)
    else:
        tile = load_tile(plane, rows, start, n, perm_d, stride_l, stride_d, ok & used[:, None],
                         BLOCK=BLOCK, BLOCK_D=BLOCK_D, ORDER=ORDER, TMA=False)
    return tile


def guard_arg() -> int:
    """The ``GUARD`` kernel argument from ``config.PARTIAL_LOADS``."""
    mode = launch_config.PARTIAL_LOADS
    if mode not in _GUARDS:
        raise ValueError(f"config.PARTIAL_LOADS must be one of {sorted(_GUARDS)}, got {mode!r}")
    return _GUARDS[mode].value


# the interpreters of triton 3.4 and 3.5 check descriptor strides in elements, not bytes
_INTERPRETER_STRIDES_IN_ELEMENTS = tuple(
    int(x) for x in triton.__version__.split(".")[:2]) < (3, 6)


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
        if not t.is_cuda and _INTERPRETER_STRIDES_IN_ELEMENTS and any(
                s % 16 for s in t.stride()[:3]):
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
