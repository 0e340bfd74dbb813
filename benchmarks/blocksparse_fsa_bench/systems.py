"""The competitor systems of the benchmark and their set-up (see :mod:`blocksparse_fsa_bench.cli`).

Each ``setup_<system>(pattern, inputs, args)`` builds what the system needs for one
(pattern, L), timing that build, and returns a :class:`SystemRun` whose ``fwd`` / ``fwdbwd``
the runner times; ``SYSTEM_SETUPS`` maps the command line's system names to them.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .patterns import MaskMod, Pattern

SYSTEMS = ("ours", "ours_indices", "ours_bias", "flex", "flex_flash", "fa4_window", "fa4_varlen",
           "fa4_dense_causal", "sdpa_causal", "sdpa_mask")
# systems that run dense causal attention whatever the pattern: timed, not checked, and their
# ``dense_tflops`` count the dense work they do
DENSE_SYSTEMS = ("fa4_dense_causal", "sdpa_causal")
# independent systems whose agreement makes ours' status "ok"
CHECKERS = ("flex", "flex_flash", "fa4_window", "fa4_varlen", "sdpa_mask")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def short_error(exc: BaseException, limit: int = 100) -> str:
    """``Type: first line`` of an exception, cut to ``limit`` characters for a table cell."""
    lines = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


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


def sync(device) -> None:
    """Wait for the GPU's queued work (nothing to wait for off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(result, ms) of one call, synchronized."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, (time.perf_counter() - t0) * 1e3


def timed_median(fn, device, runs: int = 5):
    """(result of the last call, median ms of ``runs`` synchronized calls): one call of a
    millisecond-scale build is too noisy a sample."""
    times = []
    for _ in range(runs):
        result = None  # free the previous result before the next call (dense masks are large)
        result, ms = timed(fn, device)
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
        layout, first_ms = timed(build, device)  # includes compilation the first time
        layout, ms = timed_median(build, device)
        timed(lambda: build("numba"), device)  # numba's compilation
        _, numba_ms = timed(lambda: build("numba"), device)
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
        (mask_mod, heads), prep_ms = timed(lambda: flex_mask_mod(pattern, heads_q), device)
        make, batch, note = compiled_create_block_mask(), _flex_batch(pattern), ""

        def build():
            return make(mask_mod, batch, heads, L, L, device=device)
    try:
        block_mask, first_ms = timed(build, device)
    except Exception as exc:  # fall back to the eager builder (materializes the mask)
        if pattern.flex_mask is None:
            raise
        from torch.nn.attention.flex_attention import create_block_mask as make
        note = f"compiled create_block_mask failed ({short_error(exc, 60)}); eager"
        block_mask, first_ms = timed(build, device)
    block_mask, ms = timed_median(build, device)
    flex = compiled_flex_attention()

    def fwd(**kwargs):
        out = flex(_bhld(inp.q), _bhld(inp.k), _bhld(inp.v), block_mask=block_mask,
                   enable_gqa=True, **kwargs)
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
                        checked=False, note=f"k/v repeated outside timing ({short_error(exc, 60)})")
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

    mask, first_ms = timed(build, device)
    del mask
    mask, ms = timed_median(build, device)
    kr, vr, grads = _repeated_kv(inp)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        return sdpa(_bhld(inp.q), _bhld(kr), _bhld(vr), attn_mask=mask).transpose(1, 2)

    return SystemRun(fwd, _with_backward(fwd, inp.dout), (inp.q, kr, vr), grads,
                     layout_ms=ms, layout_first_ms=first_ms, layout_mb=mask.nbytes / 2**20)


def setup_flex_flash(pattern: Pattern, inp: Inputs, args) -> SystemRun:
    """``flex`` on the same BlockMask with ``kernel_options={"BACKEND": "FLASH"}``: the mask
    runs in FlashAttention-4's CuTe kernels instead of flex's Triton ones."""
    run = setup_flex(pattern, inp, args)
    flex_fwd = run.fwd

    def fwd():
        return flex_fwd(kernel_options={"BACKEND": "FLASH"})

    run.fwd, run.fwdbwd = fwd, _with_backward(fwd, inp.dout)
    return run


def flash_attn_cute():
    """FlashAttention-4's module (``pip install flash-attn-4``), or ``Skipped`` saying why not."""
    try:
        import flash_attn.cute as fa4
    except Exception as exc:  # not installed, or its CUDA libraries do not load here
        raise Skipped(f"flash-attn-4 does not import ({short_error(exc, 80)})") from None
    return fa4


def _first(result):
    """FA4's functions return ``out`` or ``(out, lse)`` depending on the version."""
    return result[0] if isinstance(result, tuple) else result


def setup_fa4_window(pattern: Pattern, inp: Inputs, args) -> SystemRun:
    """FA4 ``flash_attn_func(q, k, v, causal=True, window_size=(W - 1, 0))``: its native
    causal sliding window, for patterns that are one."""
    if pattern.window is None:
        raise Skipped("the pattern is not a causal sliding window")
    fa4 = flash_attn_cute()

    def fwd():
        return _first(fa4.flash_attn_func(inp.q, inp.k, inp.v, causal=True,
                                           window_size=(pattern.window - 1, 0)))

    return SystemRun(fwd, _with_backward(fwd, inp.dout), (inp.q, inp.k, inp.v),
                     _native_grads(inp), note=f"flash-attn-4 {fa4.__version__}")


def setup_fa4_varlen(pattern: Pattern, inp: Inputs, args) -> SystemRun:
    """FA4 ``flash_attn_varlen_func`` over the packed documents (causal in each), for
    patterns that are packed documents; batch 1 only (the documents fill the sequence)."""
    if pattern.cu_seqlens is None:
        raise Skipped("the pattern is not packed documents")
    if inp.q.shape[0] != 1:
        raise Skipped("packed documents fill one sequence: --batch 1 only")
    fa4 = flash_attn_cute()
    cu = pattern.cu_seqlens
    longest = int((cu[1:] - cu[:-1]).max())

    def fwd():
        out = fa4.flash_attn_varlen_func(inp.q[0], inp.k[0], inp.v[0], cu_seqlens_q=cu,
                                         cu_seqlens_k=cu, max_seqlen_q=longest,
                                         max_seqlen_k=longest, causal=True)
        return _first(out).unsqueeze(0)

    return SystemRun(fwd, _with_backward(fwd, inp.dout), (inp.q, inp.k, inp.v),
                     _native_grads(inp), note=f"flash-attn-4 {fa4.__version__}")


def setup_fa4_dense_causal(pattern: Pattern, inp: Inputs, args) -> SystemRun:
    """FA4 dense causal attention on the same tensors: the utilisation ceiling that effective
    TFLOP/s are compared with (a different function, so timed but not checked)."""
    fa4 = flash_attn_cute()

    def fwd():
        return _first(fa4.flash_attn_func(inp.q, inp.k, inp.v, causal=True))

    return SystemRun(fwd, _with_backward(fwd, inp.dout), (inp.q, inp.k, inp.v),
                     _native_grads(inp), checked=False, note=f"flash-attn-4 {fa4.__version__}")


SYSTEM_SETUPS: dict[str, Callable[[Pattern, Inputs, argparse.Namespace], SystemRun]] = {
    "ours": setup_ours,
    "ours_indices": setup_ours_indices,
    "ours_bias": functools.partial(setup_ours, with_bias=True),
    "flex": setup_flex,
    "flex_flash": setup_flex_flash,
    "fa4_window": setup_fa4_window,
    "fa4_varlen": setup_fa4_varlen,
    "fa4_dense_causal": setup_fa4_dense_causal,
    "sdpa_causal": setup_sdpa_causal,
    "sdpa_mask": setup_sdpa_mask,
}

