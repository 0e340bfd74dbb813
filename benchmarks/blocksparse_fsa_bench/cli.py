"""Benchmark: ``sparse_attn_func`` vs FlexAttention and SDPA on sparse patterns.

Run on one CUDA GPU from the repository root::

    blocksparse-fsa-bench --out results/                   # default sweep (< 8 min on an H200)
    blocksparse-fsa-bench --quick --seq-len 8192 --pattern bigbird
    blocksparse-fsa-bench --out results/ --no-plot
    blocksparse-fsa-bench --pattern examples/bench_my_pattern.py:window_and_globals

(``python -m blocksparse_fsa_bench`` is the same.) It prints one row per (pattern, L, system,
pass) and writes ``<out>/bench_<gpu>.json``, ``.csv`` and ``.png`` (the plot needs matplotlib;
without it a warning is printed). ``--out`` defaults to a new directory under the system's
temporary directory; existing result files are never overwritten unless ``--overwrite``.

Patterns (causal, per KV head, ``attn_indices`` of shape ``(1, Hkv, L, W)`` built on the GPU)
    sliding_window  keys i-1023..i
    bigbird         64-token blocks: 3 local, 2 global, 3 random earlier blocks per query block
    nsa_blocks      NSA-style selection: each 64-query block takes 16 of its causal 64-token key
                    blocks (the first, the 2 local ones including the diagonal, 13 at random)
    dilated         512 keys at stride 4: i, i-4, ..., i-2044
    dilated_reordered  the same; ours builds its layout with the tokens grouped mod 4
    topk_random     1024 random keys of the causal prefix [0, i] per query (with duplicates)

Your own pattern: ``--pattern module:function`` or ``--pattern path/to/file.py:function``,
called as ``function(seq_len, heads_kv, device)`` once per length; it returns ``attn_indices``
``(B|1, Hkv|1, L, W)`` (made causal like the patterns above), a ``SparseLayout`` (used as it
is), or either with a flex ``mask_mod`` as a pair (``h`` = KV head). Without a mask_mod, flex
gets the pattern's exact BlockMask (``SparseLayout.to_flex_block_mask`` at 128x128 tiles).
See ``examples/bench_my_pattern.py`` and ``blocksparse_fsa_bench.patterns.user_pattern``.

Systems, all on the same q, k, v
    ours         ``sparse_attn_func(q, k, v, layout=build_layout(indices, is_causal=True))``:
                 the explicit path, a layout built once (``layout_ms``) and passed to every call
    ours_indices ``sparse_attn_func(q, k, v, attn_indices=indices, is_causal=True)`` on every
                 call: the implicit path. The first call builds the layout (the same build as
                 ours' ``layout_ms``) into the layout cache, keyed on the tensor's identity and
                 version; the timed calls find it there. Its cost per call shows in
                 ``host_us`` next to ours' (GPU time is the same kernels). Skipped for a
                 reordered pattern or one given as a layout.
    flex         ``torch.compile(flex_attention)`` with the tightest BlockMask a user would
                 write: an analytic ``mask_mod`` (sliding window, dilated), a per-head block
                 table (bigbird, nsa_blocks), a bit-packed dense ``[Hkv, L, L/8]`` table
                 (topk_random), all through ``create_block_mask`` at flex's default 128x128
                 blocks (its compiled backward on an H200, D=128, needs blocks of 128)
    sdpa_causal  dense causal FlashAttention through SDPA: the cost of ignoring the sparsity
                 (a different function, so timed but not checked)
    sdpa_mask    SDPA with the pattern as a dense boolean ``attn_mask`` (only L <= 8192)
    ours_bias    ours with a learnable ``(B, Hkv, 1, L)`` key bias (timed, not checked: the
                 cost of a bias and of its gradient next to the rows without)

FLOP counting
    ``nnz`` is the number of distinct (query, key) pairs of one (batch, KV head) after the
    causal cut, averaged over KV heads: ``layout.nnz / (layout.batch * layout.heads)``
    (duplicates in the indices count once). Every query head sharing that KV head computes
    ``S = QK^T`` and ``O = PV`` on those pairs, 2 FLOPs per multiply-add, so::

        fwd    = 4 * nnz * D * Hq * B
        fwdbwd = 3.5 * fwd       (backward 2.5x: recompute S, dV, dP, dQ, dK)

    Softmax and exponentials are not counted. ``tflops`` is this pattern FLOP count divided by
    the time, for every system: a system that computes masked-out pairs gets no credit for
    them. For ``sdpa_causal`` the extra column ``dense_tflops`` counts the dense causal work it
    actually does (nnz = L (L + 1) / 2).

Method
    * Before timing, one forward + backward (with a fixed random dO) per system is compared
      with ours: relative error ``||a - b|| / ||b||`` of out (and dq, dk, dv for fwdbwd) must
      be below 2e-2. A failed check gives status ``mismatch`` and no speed-up; ours itself is
      ``ok`` only when an independent system (flex or sdpa_mask) agrees with it.
    * Times are medians of ``triton.testing.do_bench``. When fwdbwd is among the passes the
      forward is timed with autograd enabled (inputs require grad), like the forward of a
      training step: flex then compiles one graph per (pattern, L) for both passes instead of
      two. With ``--passes fwd`` alone the inputs do not require grad.
    * ``layout_ms`` is the steady-state cost of building the pattern's metadata once (ours:
      ``build_layout`` + ``.to(device)``; flex: the mask_mod's tensors + compiled
      ``create_block_mask``; sdpa_mask: the dense mask), the median of 5 calls timed with
      ``perf_counter`` and a synchronize; ``layout_first_ms`` is the first call, including numba /
      torch.compile compilation. ``first_call_s`` is the check run (for flex it includes compiling
      the attention kernels).
    * ``peak_mb`` = ``max_memory_allocated`` during one call of the timed function (forward, or
      forward + backward) minus the memory allocated before it (inputs, layout, masks).
    * ``host_us`` is the host time to issue one call: 20 calls back to back without a
      synchronize (3 to 20: about 100 ms of GPU work), divided by their number (Python,
      argument checks, layout lookup, launches; what a kernel shorter than that cannot hide).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import json
import math
import re
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .patterns import PATTERNS, MaskMod, Pattern, PatternBuilder, load_pattern

SYSTEMS = ("ours", "ours_indices", "ours_bias", "flex", "sdpa_causal", "sdpa_mask")
PASSES = ("fwd", "fwdbwd")
FWDBWD_FLOP_FACTOR = 3.5
REL_TOL = 2e-2
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_REPO = Path(__file__).resolve().parents[1]


# ==== FLOP counting ==============================================================================
def pattern_flops(nnz: float, batch: int, heads_q: int, head_dim: int, pass_name: str) -> float:
    """FLOPs of attention over ``nnz`` pairs per (batch, query head): 4 nnz D Hq B, x3.5 fwdbwd."""
    fwd = 4.0 * nnz * head_dim * heads_q * batch
    return fwd * (FWDBWD_FLOP_FACTOR if pass_name == "fwdbwd" else 1.0)


def dense_causal_flops(batch: int, heads_q: int, seq_len: int, head_dim: int,
                       pass_name: str) -> float:
    """FLOPs of dense causal attention (Lq == Lk): nnz = L (L + 1) / 2 per head."""
    return pattern_flops(seq_len * (seq_len + 1) / 2, batch, heads_q, head_dim, pass_name)


def tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / ms / 1e9


# ==== systems ====================================================================================
class Skipped(Exception):
    """A system that does not apply to this configuration (reported as ``skipped: ...``)."""


@dataclass
class Inputs:
    """q ``(B, L, Hq, D)``, k/v ``(B, L, Hkv, D)`` leaves that require grad, and a fixed dO."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor

    @property
    def group(self) -> int:
        return self.q.shape[2] // self.k.shape[2]


def make_inputs(batch, seq_len, heads_q, heads_kv, head_dim, dtype, device, seed=0,
                requires_grad=True) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(heads):
        return torch.randn(batch, seq_len, heads, head_dim, generator=gen, device=device,
                           dtype=torch.float32).to(dtype)

    q, k, v, dout = randn(heads_q), randn(heads_kv), randn(heads_kv), randn(heads_q)
    return Inputs(*(t.requires_grad_(requires_grad) for t in (q, k, v)), dout)


@dataclass
class SystemRun:
    """What the runner needs from one system on one (pattern, L).

    ``fwd()`` returns the output as ``(B, L, Hq, D)``; ``fwdbwd()`` also runs the backward.
    ``leaves`` are the tensors whose ``.grad`` the backward fills; ``grads()`` returns dq, dk, dv
    in the inputs' shapes.
    """

    fwd: Callable[[], torch.Tensor]
    fwdbwd: Callable[[], None]
    leaves: tuple
    grads: Callable[[], tuple]
    checked: bool = True  # compared against ours
    layout_ms: float | None = None
    layout_first_ms: float | None = None
    layout_mb: float | None = None
    density: float | None = None
    nnz: int | None = None  # summed over the layout's batch and heads
    nnz_groups: int = 1  # layout batch * heads that nnz is summed over
    note: str = ""
    close: Callable[[], None] | None = None  # called once the system's rows are done


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    """(result, ms) of one call, synchronized."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return result, (time.perf_counter() - t0) * 1e3


def _timed_median(fn, device, runs: int = 5):
    """(result of the last call, median ms of ``runs`` synchronized calls): one call of a
    millisecond-scale build is too noisy a sample."""
    times = []
    for _ in range(runs):
        result = None  # free the previous result before the next call (dense masks are large)
        result, ms = _timed(fn, device)
        times.append(ms)
    return result, statistics.median(times)


def _with_backward(fwd, dout):
    def fwdbwd():
        fwd().backward(dout)
    return fwdbwd


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> (B, H, L, D) view, the layout of flex and SDPA."""
    return x.transpose(1, 2)


def _repeated_kv(inp: Inputs):
    """k, v repeated to Hq heads as new leaves, and a grads() that folds them back."""
    g = inp.group
    kr = inp.k.detach().repeat_interleave(g, dim=2).requires_grad_(inp.k.requires_grad)
    vr = inp.v.detach().repeat_interleave(g, dim=2).requires_grad_(inp.v.requires_grad)

    def grads():
        def fold(t):
            return t.grad.unflatten(2, (-1, g)).sum(3)
        return inp.q.grad, fold(kr), fold(vr)
    return kr, vr, grads


def _native_grads(inp: Inputs):
    return lambda: (inp.q.grad, inp.k.grad, inp.v.grad)


def setup_ours(pattern: Pattern, inp: Inputs, args, with_bias: bool = False) -> SystemRun:
    """``sparse_attn_func`` on a layout built once by ``build_layout`` (timed), or the
    pattern's own layout; ``with_bias`` adds a learnable key bias ``(B, Hkv, 1, L)`` (FSA's
    common shape; its gradient is part of the backward)."""
    import blocksparse_fsa as bsa

    device = inp.q.device
    bias = None
    if with_bias:
        shape = (inp.q.shape[0], inp.k.shape[2], 1, inp.k.shape[1])
        bias = torch.randn(shape, device=device, dtype=inp.q.dtype,
                           requires_grad=inp.q.requires_grad)

    def build(method="auto"):  # auto: PyTorch on the GPU for GPU indices
        return bsa.build_layout(pattern.indices, k_len=pattern.seq_len, is_causal=True,
                                reorder=pattern.reorder, method=method).to(device)

    if pattern.layout is not None:
        layout, ms, first_ms, note = pattern.layout, None, None, "the pattern's own layout"
    else:
        layout, first_ms = _timed(build, device)  # includes compilation the first time
        layout, ms = _timed_median(build, device)
        _timed(lambda: build("numba"), device)  # numba's compilation
        _, numba_ms = _timed(lambda: build("numba"), device)
        note = f"layout build with numba on the host: {numba_ms:.0f} ms"

    def fwd():
        return bsa.sparse_attn_func(inp.q, inp.k, inp.v, layout=layout, attn_bias=bias)

    leaves = (inp.q, inp.k, inp.v) + ((bias,) if with_bias else ())
    return SystemRun(fwd, _with_backward(fwd, inp.dout), leaves,
                     _native_grads(inp), checked=not with_bias, layout_ms=ms,
                     layout_first_ms=first_ms, layout_mb=layout.nbytes / 2**20,
                     density=layout.density, nnz=layout.nnz,
                     nnz_groups=layout.batch * layout.heads,
                     note=note + ("; with a (B, Hkv, 1, L) bias and its gradient" if with_bias
                                  else ""))


def setup_ours_indices(pattern: Pattern, inp: Inputs, args) -> SystemRun:
    """``sparse_attn_func(q, k, v, attn_indices=indices, is_causal=True)`` on every call: the
    implicit path. The check run builds the layout (as ours' ``layout_ms``) into the layout
    cache; the timed calls find it there (keyed on the tensor's identity and version), so next
    to ``ours`` (``layout=``) these rows show what the lookup costs per call (``host_us``)."""
    import blocksparse_fsa as bsa

    if pattern.indices is None:
        raise Skipped("the pattern is a layout, not attn_indices")
    if pattern.reorder is not None:
        raise Skipped("attn_indices= takes no token permutation")
    bsa.clear_layout_cache()
    indices = pattern.indices

    def fwd():
        return bsa.sparse_attn_func(inp.q, inp.k, inp.v, attn_indices=indices, is_causal=True)

    return SystemRun(fwd, _with_backward(fwd, inp.dout), (inp.q, inp.k, inp.v),
                     _native_grads(inp), close=bsa.clear_layout_cache,
                     note="layout built by the first call, then found in the layout cache")


_COMPILED: dict[str, Callable] = {}


def _raise_recompile_limits() -> None:
    """Each (pattern, L) is a new flex graph; keep dynamo from falling back to eager."""
    cfg = torch._dynamo.config
    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64),
                        ("accumulated_cache_size_limit", 512),
                        ("accumulated_recompile_limit", 512)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))


def compiled_flex_attention() -> Callable:
    """One ``torch.compile(flex_attention)`` for the whole sweep (static shapes)."""
    if "flex" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention
        _raise_recompile_limits()
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def compiled_create_block_mask() -> Callable:
    """``torch.compile(create_block_mask)``: never materializes the [H, L, L] mask."""
    if "block_mask" not in _COMPILED:
        from torch.nn.attention.flex_attention import create_block_mask
        _raise_recompile_limits()
        _COMPILED["block_mask"] = torch.compile(create_block_mask, dynamic=False)
    return _COMPILED["block_mask"]


def flex_mask_mod(pattern: Pattern, heads_q: int) -> tuple[MaskMod, int | None]:
    """``(mask_mod, H)`` to give ``create_block_mask`` for ``heads_q`` query heads.

    Flex passes the *query* head to ``mask_mod`` and indexes the BlockMask by
    ``query_head % H``; a per-KV-head pattern therefore needs H = Hq and ``h // group``, while
    a head-independent one uses H = None (one head, broadcast).
    """
    mask_kv = pattern.flex_mask()
    if not pattern.per_head:
        return mask_kv, None
    group = heads_q // pattern.num_kv_heads

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_kv(b, h // group, q_idx, kv_idx)
    return mask_mod, heads_q


# Flex's compiled kernels need the BlockMask's blocks to be multiples of their tiles; on an H200
# at D=128 the default backward tiles are 64x128 and 128x64, so a BlockMask exported from our
# 64x64 layout would only run forward. Flex's own default, 128x128, runs both.
FLEX_BLOCK = 128


def flex_block_mask(pattern: Pattern, heads_q: int, device, make: Callable | None = None):
    """BlockMask of ``pattern``: ``make`` (default: the eager ``create_block_mask``) on its
    ``mask_mod``, or without one the exact BlockMask of its ``FLEX_BLOCK``-tile layout."""
    if pattern.flex_mask is None:
        return pattern.exact_layout(FLEX_BLOCK).to_flex_block_mask(heads_q)
    if make is None:
        from torch.nn.attention.flex_attention import create_block_mask as make
    mask_mod, heads = flex_mask_mod(pattern, heads_q)
    return make(mask_mod, _flex_batch(pattern), heads, pattern.seq_len, pattern.seq_len,
                device=device)


def _flex_batch(pattern: Pattern) -> int | None:
    return pattern.batch if pattern.batch > 1 else None  # None: broadcast over the batch


def block_mask_stats(block_mask, nnz_per_head: float) -> tuple[float, float]:
    """(MiB of the BlockMask's tensors, useful pairs / pairs in visited blocks)."""
    tensors = [t for t in block_mask.as_tuple() if isinstance(t, torch.Tensor)]
    mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    visited = block_mask.kv_num_blocks.sum(-1).double().mean()
    if block_mask.full_kv_num_blocks is not None:
        visited = visited + block_mask.full_kv_num_blocks.sum(-1).double().mean()
    bq, bk = block_mask.BLOCK_SIZE
    visited = float(visited) * bq * bk
    return mb, (nnz_per_head / visited if visited else 1.0)


def setup_flex(pattern: Pattern, inp: Inputs, args) -> SystemRun:
    """Compiled FlexAttention on a BlockMask from compiled ``create_block_mask``, GQA native.

    ``layout_ms`` = building the mask_mod's tensors (block table, dense topk mask) + one
    ``create_block_mask`` call once compiled (the second call, with the same mask_mod). A
    pattern without a mask_mod gets the exact BlockMask of its ``FLEX_BLOCK``-tile layout
    (``layout_ms``: that layout's build + ``to_flex_block_mask``).
    """
    device, heads_q, L = inp.q.device, inp.q.shape[2], pattern.seq_len
    if pattern.flex_mask is None:
        def build():
            return flex_block_mask(pattern, heads_q, device)
        prep_ms, note = 0.0, f"exact BlockMask of the pattern ({FLEX_BLOCK}x{FLEX_BLOCK} tiles)"
    else:
        (mask_mod, heads), prep_ms = _timed(lambda: flex_mask_mod(pattern, heads_q), device)
        make, batch, note = compiled_create_block_mask(), _flex_batch(pattern), ""

        def build():
            return make(mask_mod, batch, heads, L, L, device=device)
    try:
        block_mask, first_ms = _timed(build, device)
    except Exception as exc:  # fall back to the eager builder (materializes the mask)
        if pattern.flex_mask is None:
            raise
        from torch.nn.attention.flex_attention import create_block_mask as make
        note = f"compiled create_block_mask failed ({_short(exc, 60)}); eager"
        block_mask, first_ms = _timed(build, device)
    block_mask, ms = _timed_median(build, device)
    flex = compiled_flex_attention()

    def fwd():
        out = flex(_bhld(inp.q), _bhld(inp.k), _bhld(inp.v), block_mask=block_mask,
                   enable_gqa=True)
        return out.transpose(1, 2)

    mb, density = block_mask_stats(block_mask, pattern.nnz() / pattern.groups)
    return SystemRun(fwd, _with_backward(fwd, inp.dout), (inp.q, inp.k, inp.v),
                     _native_grads(inp), layout_ms=prep_ms + ms,
                     layout_first_ms=prep_ms + first_ms, layout_mb=mb, density=density, note=note)


def setup_sdpa_causal(pattern: Pattern, inp: Inputs, args) -> SystemRun:
    """Dense causal FlashAttention via SDPA (GQA native, or k/v repeated if flash refuses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def native():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = sdpa(_bhld(inp.q), _bhld(inp.k), _bhld(inp.v), is_causal=True,
                       enable_gqa=True)
        return out.transpose(1, 2)

    try:  # probe once: does flash take GQA here?
        native().backward(inp.dout) if inp.q.requires_grad else native()
        run = SystemRun(native, _with_backward(native, inp.dout), (inp.q, inp.k, inp.v),
                        _native_grads(inp), checked=False)
    except (RuntimeError, TypeError) as exc:
        kr, vr, grads = _repeated_kv(inp)

        def repeated():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = sdpa(_bhld(inp.q), _bhld(kr), _bhld(vr), is_causal=True)
            return out.transpose(1, 2)

        run = SystemRun(repeated, _with_backward(repeated, inp.dout), (inp.q, kr, vr), grads,
                        checked=False, note=f"k/v repeated outside timing ({_short(exc, 60)})")
    for t in (inp.q, inp.k, inp.v):
        t.grad = None
    return run


def setup_sdpa_mask(pattern: Pattern, inp: Inputs, args) -> SystemRun:
    """SDPA with the pattern as a dense bool ``attn_mask``; k/v repeated to Hq outside timing
    so the mask-capable fused kernels (not the math fallback) are eligible."""
    L = pattern.seq_len
    if L > args.sdpa_mask_max_len:
        raise Skipped(f"dense mask only for L <= {args.sdpa_mask_max_len}")
    device = inp.q.device
    heads_q = inp.q.shape[2]

    def build():
        mask = pattern.dense_mask()  # (B|1, Hkv|1, L, L)
        if mask.shape[1] > 1:  # (B|1, Hq, L, L); one head broadcasts
            mask = mask.repeat_interleave(heads_q // mask.shape[1], dim=1)
        return mask

    mask, first_ms = _timed(build, device)
    del mask
    mask, ms = _timed_median(build, device)
    kr, vr, grads = _repeated_kv(inp)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        return sdpa(_bhld(inp.q), _bhld(kr), _bhld(vr), attn_mask=mask).transpose(1, 2)

    return SystemRun(fwd, _with_backward(fwd, inp.dout), (inp.q, kr, vr), grads,
                     layout_ms=ms, layout_first_ms=first_ms, layout_mb=mask.nbytes / 2**20)


SYSTEM_SETUPS: dict[str, Callable[[Pattern, Inputs, argparse.Namespace], SystemRun]] = {
    "ours": setup_ours,
    "ours_indices": setup_ours_indices,
    "ours_bias": functools.partial(setup_ours, with_bias=True),
    "flex": setup_flex,
    "sdpa_causal": setup_sdpa_causal,
    "sdpa_mask": setup_sdpa_mask,
}


# ==== runner =====================================================================================
@dataclass
class Row:
    pattern: str
    seq_len: int
    system: str
    pass_name: str
    status: str = "ok"
    ms: float | None = None
    tflops: float | None = None
    dense_tflops: float | None = None
    speedup_vs_flex: float | None = None
    rel_err: float | None = None
    nan_count: int | None = None
    peak_mb: float | None = None
    host_us: float | None = None
    layout_ms: float | None = None
    layout_first_ms: float | None = None
    layout_mb: float | None = None
    density: float | None = None
    nnz: int | None = None  # distinct pairs summed over the KV heads (mean over the batch)
    first_call_s: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return {("pass" if k == "pass_name" else k): v for k, v in asdict(self).items()}


def _short(exc: BaseException, limit: int = 100) -> str:
    lines = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (nan if either holds a NaN)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_ms(fn, leaves, args, device) -> float:
    """Median ms of ``fn`` by ``triton.testing.do_bench`` (a plain loop off CUDA, for tests)."""
    if torch.device(device).type != "cuda":
        times = [_timed(fn, device)[1] for _ in range(3)]
        return sorted(times)[1]
    import triton.testing
    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep,
                                   grad_to_none=list(leaves) or None, return_mode="median")


def peak_mb(fn, leaves, device) -> float | None:
    """Peak extra GPU memory (MiB) of one ``fn()`` over what was allocated before it."""
    if torch.device(device).type != "cuda":
        return None
    for t in leaves:
        t.grad = None
    _free()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in leaves:
        t.grad = None
    return peak / 2**20


def host_calls(ms: float) -> int:
    """Calls for ``host_us``: 20, fewer when they would queue more than ~100 ms of GPU work
    (which the next measurement would wait for), at least 3."""
    return max(3, min(20, round(100 / ms))) if ms else 20


def host_us(fn, leaves, device, calls: int = 20) -> float:
    """Host time (us) to issue one ``fn()``: ``calls`` back-to-back calls with no
    synchronization between them, so the GPU work queues up and what is timed is the Python,
    dispatch and launch overhead (the part a short kernel cannot hide). Off CUDA (tests) the
    calls run the work itself: two of them."""
    if torch.device(device).type != "cuda":
        calls = 2
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    _sync(device)
    for t in leaves:
        t.grad = None
    return elapsed / calls * 1e6


def check_run(run: SystemRun, inp: Inputs, with_backward: bool, device):
    """One forward (+ backward) kept for the checks: (out, (dq, dk, dv) or None, seconds)."""
    for t in run.leaves:
        t.grad = None
    t0 = time.perf_counter()
    out = run.fwd()
    grads = None
    if with_backward:
        out.backward(inp.dout)
        grads = tuple(g.detach().clone() for g in run.grads())
    _sync(device)
    seconds = time.perf_counter() - t0
    for t in run.leaves:
        t.grad = None
    return out.detach().clone(), grads, seconds


def _nan_count(*tensors) -> int:
    return int(sum(int(torch.isnan(t).sum()) for t in tensors if t is not None))


class Progress:
    """Where a sweep stands, on stderr: one step per (pattern, L, system, pass).

    A tqdm bar when tqdm is installed and the stream is a terminal, else one line per step,
    ``[3/40] sliding_window L=32768 flex fwd  (12 s)``, which also reads well in a log file.
    ``bar``: True / False force or refuse the bar (True still needs tqdm).
    """

    def __init__(self, total: int, stream=None, bar: bool | None = None):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.stream = sys.stderr if stream is None else stream
        tqdm = _tqdm() if bar is not False else None
        if bar is None:
            tqdm = tqdm if self.stream.isatty() else None
        self._bar = None if tqdm is None else tqdm(total=total, file=self.stream,
                                                   unit="step", dynamic_ncols=True)

    def step(self, label: str, count: int = 1) -> None:
        """The next ``count`` steps start (more than one: steps that will not run)."""
        first, self.done = self.done + 1, min(self.done + count, self.total)
        if self._bar is not None:
            self._bar.update(first - 1 - self._bar.n)  # the steps before these are done
            self._bar.set_description_str(label)
            return
        where = f"{first}" if self.done <= first else f"{first}-{self.done}"
        print(f"[{where}/{self.total}] {label}  ({time.perf_counter() - self.t0:.0f} s)",
              file=self.stream, flush=True)

    def log(self, msg: str, file=None) -> None:
        """Print a line to ``file`` (default: the progress stream) without breaking the bar."""
        file = self.stream if file is None else file
        if self._bar is not None:
            self._bar.write(msg, file=file)
        else:
            print(msg, file=file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
            self._bar.close()


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:  # optional: the plain counter instead
        return None
    return tqdm


def run_system(system: str, pattern: Pattern, inp: Inputs, args, ref, device,
               progress: Progress | None = None) -> tuple[list, tuple]:
    """Rows (one per pass) of one system, and its (out, grads) for later checks."""
    rows = [Row(pattern.name, pattern.seq_len, system, p) for p in args.passes]
    with_backward = "fwdbwd" in args.passes
    run = None
    result = (None, None)
    step = "setup"
    announced = 0  # passes announced to ``progress``

    def announce(suffix: str = "", count: int = 1):
        nonlocal announced
        if progress is not None and announced < len(rows):
            progress.step(f"{pattern.name} L={pattern.seq_len} {system} "
                          f"{rows[announced].pass_name}{suffix}", count)
        announced += count

    try:
        announce()  # the first pass' step includes the setup and the check
        run = SYSTEM_SETUPS[system](pattern, inp, args)
        step = "check"
        out, grads, seconds = check_run(run, inp, with_backward, device)
        result = (out, grads)
        for row in rows:
            row.first_call_s, row.note = seconds, run.note
            row.layout_ms, row.layout_first_ms = run.layout_ms, run.layout_first_ms
            row.layout_mb, row.density = run.layout_mb, run.density
            if run.nnz is not None:
                row.nnz = round(run.nnz * pattern.groups / run.nnz_groups)
            bwd = row.pass_name == "fwdbwd"
            row.nan_count = _nan_count(out, *(grads if bwd else ()))
            if system == "ours":
                row.status = "ok"  # the reference; finalize() says whether others agree
            elif not run.checked:
                row.status = "unchecked"
            elif ref[0] is None:
                row.status = "unchecked"
                row.note = (row.note + "; " if row.note else "") + "no reference (ours failed)"
            else:
                errs = [rel_err(out, ref[0])]
                if bwd:
                    errs += [rel_err(a, b) for a, b in zip(grads, ref[1])]
                row.rel_err = max(errs) if not any(math.isnan(e) for e in errs) else math.nan
                row.status = "ok" if row.rel_err < REL_TOL else "mismatch"
        for i, row in enumerate(rows):
            step = f"{row.pass_name} timing"
            if i == announced:
                announce()
            fn = run.fwd if row.pass_name == "fwd" else run.fwdbwd
            leaves = run.leaves if row.pass_name == "fwdbwd" else ()
            row.peak_mb = peak_mb(fn, run.leaves, device)
            row.ms = bench_ms(fn, leaves, args, device)
            row.host_us = host_us(fn, run.leaves, device, calls=host_calls(row.ms))
    except Skipped as exc:
        for row in rows:
            row.status = f"skipped: {exc}"
    except Exception as exc:  # OOM, compile failure, ...: report and go on
        msg = _short(exc)
        for row in rows:
            if row.ms is None:
                row.status, row.ms = f"error ({step}): {msg}", None
    finally:
        if run is not None:
            for t in run.leaves:
                t.grad = None
            if run.close is not None:
                run.close()
        del run
        _free()
        if announced < len(rows):  # passes that will not run after a skip or an error
            announce(f": {rows[announced].status}", len(rows) - announced)
    return rows, result


def finalize(rows: list[Row], pattern: Pattern, args, nnz_ref: int) -> None:
    """Fill nnz, TFLOP/s, ours' status and speed-ups of one (pattern, L) once all ran."""
    by = {(r.system, r.pass_name): r for r in rows}
    for p in args.passes:
        ours = by.get(("ours", p))
        if ours is not None and ours.status == "ok":
            verdicts = [by[(s, p)].status for s in ("flex", "sdpa_mask") if (s, p) in by]
            if ours.nan_count:
                ours.status = "mismatch"  # NaN in out or grads
            elif "ok" in verdicts:
                ours.status = "ok"
            elif "mismatch" in verdicts:
                ours.status = "mismatch"
            else:
                ours.status = "unverified"
        same = by.get(("ours_indices", p))  # checked against ours: as good as ours
        if same is not None and same.status == "ok" and ours is not None:
            same.status = ours.status
    nnz = by[("ours", args.passes[0])].nnz if ("ours", args.passes[0]) in by else None
    if nnz is None:
        nnz = nnz_ref
    elif nnz != nnz_ref:
        warnings.warn(f"{pattern.name} L={pattern.seq_len}: layout.nnz={nnz} but the pattern "
                      f"has {nnz_ref} distinct pairs")
    nnz_per_head = nnz / pattern.groups  # one (batch, KV head), averaged
    L = pattern.seq_len
    for r in rows:
        r.nnz = round(nnz_per_head * args.heads_kv)
        r.tflops = tflops(pattern_flops(nnz_per_head, args.batch, args.heads_q, args.head_dim,
                                        r.pass_name), r.ms)
        if r.system == "sdpa_causal":
            r.dense_tflops = tflops(dense_causal_flops(args.batch, args.heads_q, L,
                                                       args.head_dim, r.pass_name), r.ms)
    good = ("ok", "unchecked", "unverified")
    for p in args.passes:
        flex = by.get(("flex", p))
        if flex is None or flex.status not in good or not flex.ms:
            continue
        for s in SYSTEMS:
            r = by.get((s, p))
            if r is not None and r.status in good and r.ms:
                r.speedup_vs_flex = flex.ms / r.ms


def run_pattern(name: str, build: PatternBuilder, seq_len: int, args, device,
                progress: Progress | None = None) -> list[Row]:
    """All systems and passes of one (pattern, L); ``build`` from ``load_pattern``."""
    try:
        pattern = build(seq_len, args.heads_kv, device)
        if pattern.batch not in (1, args.batch):
            raise ValueError(f"the pattern has batch {pattern.batch}; expected 1 or --batch "
                             f"{args.batch}")
        nnz_ref = pattern.nnz()
        inp = make_inputs(args.batch, seq_len, args.heads_q, args.heads_kv, args.head_dim,
                          args.torch_dtype, device, seed=args.seed,
                          requires_grad="fwdbwd" in args.passes)
    except Exception as exc:
        msg = f"error (pattern): {_short(exc)}"
        _free()
        if progress is not None:
            progress.step(f"{name} L={seq_len}: {msg}", len(args.systems) * len(args.passes))
        return [Row(name, seq_len, s, p, status=msg) for s in args.systems for p in args.passes]
    rows, ref = [], (None, None)
    for system in sorted(args.systems, key=SYSTEMS.index):  # ours first: it is the reference
        t0 = time.perf_counter()
        sys_rows, result = run_system(system, pattern, inp, args, ref, device, progress)
        if system == "ours":
            ref = result  # (None, None) if ours failed
        del result
        rows += sys_rows
        if progress is not None:
            progress.log(f"  {system:<12} {time.perf_counter() - t0:6.1f} s  "
                         f"{', '.join(sorted({r.status for r in sys_rows}))}")
    finalize(rows, pattern, args, nnz_ref)
    del pattern, inp, ref
    _free()
    return rows


# ==== output =====================================================================================
_COLUMNS = (("pattern", "pattern", "{:<17}"), ("L", "seq_len", "{:>6}"),
            ("system", "system", "{:<12}"), ("pass", "pass_name", "{:<6}"),
            ("ms", "ms", "{:>9.3f}"), ("TFLOP/s", "tflops", "{:>7.1f}"),
            ("dense", "dense_tflops", "{:>6.1f}"), ("x_flex", "speedup_vs_flex", "{:>6.2f}"),
            ("rel_err", "rel_err", "{:>8.1e}"), ("nan", "nan_count", "{:>4}"),
            ("peak_MB", "peak_mb", "{:>8.0f}"), ("host_us", "host_us", "{:>7.0f}"),
            ("layout_ms", "layout_ms", "{:>9.1f}"),
            ("layout_MB", "layout_mb", "{:>9.1f}"), ("density", "density", "{:>7.3f}"),
            ("status", "status", "{}"))


def format_row(row: Row | None = None) -> str:
    """One table line (the header when ``row`` is None)."""
    cells = []
    for title, attr, fmt in _COLUMNS:
        width = int(re.search(r"(\d+)", fmt).group(1)) if re.search(r"\d", fmt) else 0
        if row is None:
            cells.append(title.ljust(width) if "<" in fmt or not width else title.rjust(width))
            continue
        value = getattr(row, attr)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            cells.append(("-" if value is None else "nan").rjust(width))
        else:
            cells.append(fmt.format(value))
    return "  ".join(cells)


def summary(rows: list[Row], seq_lens, sdpa_mask_max_len: int) -> list[str]:
    """The headline numbers: ours vs flex, vs dense causal flash, vs SDPA + dense mask."""
    idx = {(r.pattern, r.seq_len, r.system, r.pass_name): r for r in rows}
    L = 32768 if 32768 in seq_lens else max(seq_lens)
    lines = [f"Summary (L={L} unless noted)"]

    def fmt(x, spec="{:.2f}x"):
        return "n/a" if x is None else spec.format(x)

    patterns = list(dict.fromkeys(r.pattern for r in rows))
    for pat in patterns:
        parts = [f"{p} {fmt(getattr(idx.get((pat, L, 'ours', p)), 'speedup_vs_flex', None))}"
                 for p in PASSES]
        lines.append(f"  {pat:<17} ours vs flex:  " + ", ".join(parts))
    cache = []
    for pat in patterns:
        a, b = idx.get((pat, L, "ours", "fwd")), idx.get((pat, L, "ours_indices", "fwd"))
        if a and b and a.host_us and b.host_us:
            cache.append(f"{pat} {b.host_us:.0f} vs {a.host_us:.0f}")
    if cache:
        lines.append("  host us per fwd call, attn_indices= (layout cache) vs layout=:  "
                     + ", ".join(cache))
    ours = idx.get(("sliding_window", L, "ours", "fwd"))
    dense = idx.get(("sliding_window", L, "sdpa_causal", "fwd"))
    if ours and dense and ours.tflops and dense.dense_tflops and ours.status == "ok":
        lines.append(f"  sliding_window ours fwd {ours.tflops:.0f} effective TFLOP/s = "
                     f"{100 * ours.tflops / dense.dense_tflops:.0f}% of sdpa_causal's dense "
                     f"{dense.dense_tflops:.0f} TFLOP/s")
    elif "sliding_window" in patterns:
        lines.append("  sliding_window ours fwd TFLOP/s vs sdpa_causal dense: n/a")
    mask_lens = [x for x in seq_lens if x <= sdpa_mask_max_len]
    if mask_lens:
        Lm = max(mask_lens)
        for pat in patterns:
            parts = []
            for p in PASSES:
                a, b = idx.get((pat, Lm, "ours", p)), idx.get((pat, Lm, "sdpa_mask", p))
                ok = (a and b and a.ms and b.ms and a.status == "ok" and b.status == "ok")
                parts.append(f"{p} {fmt(b.ms / a.ms if ok else None)}")
            if any("n/a" not in s for s in parts):
                lines.append(f"  {pat:<14} ours vs sdpa_mask (L={Lm}):  " + ", ".join(parts))
    return lines


def git_commit(repo: Path = _REPO) -> str:
    """Short HEAD commit, '-dirty' if the tree has changes; 'unknown' without git/commits.

    ``BSA_COMMIT`` overrides it, for copies of the tree without ``.git`` (a remote GPU box).
    """
    if os.environ.get("BSA_COMMIT"):
        return os.environ["BSA_COMMIT"]

    def git(*cmd):
        try:
            res = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    status = git("status", "--porcelain")
    return commit + ("-dirty" if status else "")


def metadata(args, device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.device(device).type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": args.batch, "heads_q": args.heads_q, "heads_kv": args.heads_kv,
        "head_dim": args.head_dim, "dtype": str(args.torch_dtype).replace("torch.", ""),
        "seq_lens": list(args.seq_len), "patterns": list(args.pattern),
        "systems": list(args.systems), "passes": list(args.passes),
        "warmup_ms": args.warmup, "rep_ms": args.rep, "rel_tol": REL_TOL,
        "flops": "fwd = 4*nnz*D*Hq*B with nnz = distinct causal pairs per (batch, KV head); "
                 "fwdbwd = 3.5*fwd; dense_tflops (sdpa_causal) uses nnz = L(L+1)/2",
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_out_dir() -> Path:
    """A new directory for one run's results under the system's temporary directory, so that
    a run never writes into the repository's results of record by default."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "blocksparse_fsa_bench" / stamp


def write_results(rows: list[Row], meta: dict, out_dir: Path, plot: bool = True,
                  overwrite: bool = False) -> list[Path]:
    """``bench_<gpu>.json`` / ``.csv`` (rows + metadata) and, if asked, ``.png``. Raises
    ``FileExistsError`` rather than replace an existing file, unless ``overwrite``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_{slug(meta['gpu'])}"
    dicts = [r.as_dict() for r in rows]
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv")]
    existing = [p for p in (*paths, stem.with_suffix(".png")) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists: pass another --out, or --overwrite")
    strict = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
              for d in dicts]  # NaN is not JSON
    paths[0].write_text(json.dumps({"meta": meta, "rows": strict}, indent=1, default=str) + "\n")
    meta_cols = {k: v for k, v in meta.items()
                 if not isinstance(v, (list, dict)) and k != "flops"}
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*dicts[0], *meta_cols] if dicts else [])
        writer.writeheader()
        for d in dicts:
            writer.writerow({**d, **meta_cols})
    if plot:
        png = plot_results(rows, meta, stem.with_suffix(".png"))
        if png is not None:
            paths.append(png)
    return paths


def plot_results(rows: list[Row], meta: dict, path: Path) -> Path | None:
    """One panel per pass; per (pattern, L) one bar per system: speed-up vs flex (or
    effective TFLOP/s when no speed-up could be computed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    passes = [p for p in PASSES if any(r.pass_name == p for r in rows)]
    groups = list(dict.fromkeys((r.pattern, r.seq_len) for r in rows))
    systems = [s for s in SYSTEMS if any(r.system == s for r in rows)]
    metric = "speedup_vs_flex" if any(r.speedup_vs_flex for r in rows) else "tflops"
    idx = {(r.pattern, r.seq_len, r.system, r.pass_name): getattr(r, metric) for r in rows}
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(8, 1.3 * len(groups)), 3.6 * len(passes)),
                             squeeze=False)
    width = 0.8 / max(1, len(systems))
    for ax, p in zip(axes[:, 0], passes):
        for k, s in enumerate(systems):
            xs, ys = [], []
            for g, (pat, L) in enumerate(groups):
                y = idx.get((pat, L, s, p))
                if y:
                    xs.append(g + (k - (len(systems) - 1) / 2) * width)
                    ys.append(y)
            bars = ax.bar(xs, ys, width, label=s, color=f"C{SYSTEMS.index(s)}")
            ax.bar_label(bars, fmt="%.2g", fontsize=6)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{pat}\nL={L}" for pat, L in groups], fontsize=8)
        if metric == "speedup_vs_flex":
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("speed-up vs FlexAttention")
        else:
            ax.set_ylabel("effective TFLOP/s")
        ax.set_title(p, fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(systems), fontsize=8,
               bbox_to_anchor=(0.5, 0.975))
    fig.suptitle(f"{meta['gpu']}  B={meta['batch']} Hq={meta['heads_q']} Hkv={meta['heads_kv']} "
                 f"D={meta['head_dim']} {meta['dtype']}  (higher is better; no bar = failed, "
                 f"skipped or mismatched)", fontsize=9, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


# ==== CLI ========================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="blocksparse-fsa-bench",
        description="Time sparse_attn_func against FlexAttention and SDPA on sparse patterns "
                    "(one CUDA GPU). FLOPs are counted on the pattern's non-zeros: "
                    "fwd = 4*nnz*D*Hq*B, fwdbwd = 3.5x.")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[8192, 32768], metavar="L",
                    help="sequence lengths (Lq = Lk; default: 8192 32768)")
    ap.add_argument("--pattern", nargs="+", default=list(PATTERNS), metavar="NAME",
                    help=f"patterns: built-in ({', '.join(PATTERNS)}; default: all) or your "
                         "own as module:function or path/to/file.py:function, called as "
                         "function(seq_len, heads_kv, device) and returning attn_indices "
                         "(B|1, Hkv|1, L, W), a SparseLayout, or either with a flex mask_mod "
                         "as a pair (see blocksparse_fsa_bench.patterns.user_pattern)")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                    metavar="NAME", help=f"systems (default: all of {', '.join(SYSTEMS)})")
    ap.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES),
                    metavar="PASS", help="fwd and/or fwdbwd (default: both)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    ap.add_argument("--heads-q", type=int, default=32, help="query heads (default: 32)")
    ap.add_argument("--heads-kv", type=int, default=8, help="key/value heads (default: 8)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="bf16 (default) or fp16")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: a new directory under the system's "
                         "temporary directory); existing result files are never replaced")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace result files that already exist in --out")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (warmup 10, rep 30 ms)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    ap.add_argument("--sdpa-mask-max-len", type=int, default=8192,
                    help="largest L at which sdpa_mask builds its dense mask (default 8192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke tests
    args = ap.parse_args(argv)
    if args.heads_q % args.heads_kv:
        ap.error(f"--heads-q ({args.heads_q}) must be a multiple of --heads-kv ({args.heads_kv})")
    args.warmup, args.rep = (10, 30) if args.quick else (25, 100)
    if args.out is None:
        args.out = default_out_dir()
    args.torch_dtype = DTYPES[args.dtype]
    args.passes = [p for p in PASSES if p in args.passes]
    args.patterns = []  # (row name, builder)
    for spec in args.pattern:
        try:
            args.patterns.append(load_pattern(spec))
        except Exception as exc:  # a typo, an import error in the user's module, ...
            ap.error(f"--pattern {spec}: {type(exc).__name__}: {exc}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    meta = metadata(args, device)
    if not args.overwrite:  # fail before the sweep, not after it
        stem = args.out / f"bench_{slug(meta['gpu'])}"
        taken = [stem.with_suffix(x) for x in (".json", ".csv", ".png")
                 if stem.with_suffix(x).exists()]
        if taken:
            print(f"error: {taken[0]} exists: pass another --out, or --overwrite",
                  file=sys.stderr)
            return 2
    print(f"# {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {meta['git_commit']} | B={args.batch} Hq={args.heads_q} Hkv={args.heads_kv} "
          f"D={args.head_dim} {meta['dtype']} | warmup {args.warmup} ms, rep {args.rep} ms")
    print(format_row())
    rows: list[Row] = []
    t_start = time.perf_counter()
    progress = Progress(len(args.seq_len) * len(args.patterns) * len(args.systems)
                        * len(args.passes))
    for seq_len in args.seq_len:
        for name, build in args.patterns:
            new = run_pattern(name, build, seq_len, args, device, progress)
            for r in new:
                progress.log(format_row(r), file=sys.stdout)
            rows += new
    progress.close()
    print()
    print("\n".join(summary(rows, args.seq_len, args.sdpa_mask_max_len)))
    paths = write_results(rows, meta, args.out, plot=not args.no_plot, overwrite=args.overwrite)
    print(f"wrote {', '.join(str(p) for p in paths)}  ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
