"""The Triton forward and backward as ``torch.library`` custom ops.

``torch.compile`` treats each op as one opaque call whose output shapes come from the fake
implementations below, so a model calling ``sparse_attn_func(..., layout=layout)`` compiles
with ``fullgraph=True``. A ``SparseLayout`` is not a type an op signature can carry: it travels
as its tile tensors plus its integer sizes, and the op rebuilds it on the other side.
"""

from __future__ import annotations

import os
import weakref

import torch

from .kernels import gather_attn_fwd, sparse_attn_bwd, sparse_attn_fwd
from .layout.core import GatherIndex, SparseLayout

# the tensors and sizes of a SparseLayout that the kernels read: the tiles, then the token
# permutation or the gather lists if the layout has them; not causality (already in the tiles)
# or nnz, so that torch.compile does not specialise a graph on them
_TILE_FIELDS = ("full_ptr", "full_col", "part_ptr", "part_col", "masks",
                "full_ptr_t", "full_row_t", "part_ptr_t", "part_row_t", "part_mask_t")
_PERM_FIELDS = ("q_perm", "k_perm")
_GATHER_FIELDS = ("row_ptr", "col")  # what the gather forward reads
_SIZE_FIELDS = ("q_len", "k_len", "block_m", "block_n", "batch", "heads", "perm_dilation")


def _flatten(layout: SparseLayout):
    """``tiles`` (tensors) and ``sizes`` (ints, the last one 0 = plain, 1 = reordered,
    2 = gather) of what the kernels read."""
    tiles = [getattr(layout, f) for f in _TILE_FIELDS]
    kind = 0
    if layout.is_reordered:
        tiles += [getattr(layout, f) for f in _PERM_FIELDS]
        kind = 1
    elif layout.gather_index is not None:
        tiles += [getattr(layout.gather_index, f) for f in _GATHER_FIELDS]
        kind = 2
    return tiles, [int(getattr(layout, f)) for f in _SIZE_FIELDS] + [kind]


def _unflatten(tiles, sizes) -> SparseLayout:
    """The kernels' view of a layout (``is_causal`` and ``nnz`` are placeholders)."""
    *sizes, kind = sizes
    sizes = dict(zip(_SIZE_FIELDS, sizes))
    extra = {}
    if kind == 1:
        extra = dict(zip(_PERM_FIELDS, tiles[len(_TILE_FIELDS):]))
    elif kind == 2:
        extra["gather_index"] = GatherIndex(
            q_len=sizes["q_len"], k_len=sizes["k_len"], batch=sizes["batch"],
            heads=sizes["heads"], is_causal=False,
            **dict(zip(_GATHER_FIELDS, tiles[len(_TILE_FIELDS):])))
    return SparseLayout(**sizes, **dict(zip(_TILE_FIELDS, tiles)), **extra, is_causal=False,
                        nnz=0)


def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: list[torch.Tensor],
              sizes: list[int], softmax_scale: float, softcap: float,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _unflatten(tiles, sizes)
    if layout.gather_index is not None:
        return gather_attn_fwd(q, k, v, layout.gather_index, softmax_scale, softcap)
    return sparse_attn_fwd(q, k, v, layout, softmax_scale, softcap, bias)


_fwd = torch.library.custom_op("blocksparse_fsa::fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(q, k, v, tiles, sizes, softmax_scale, softcap, bias):
    batch, q_len, num_q_heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(batch, num_q_heads, q_len, dtype=torch.float32))


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
              tiles: list[torch.Tensor], sizes: list[int], softmax_scale: float, softcap: float,
              bias: torch.Tensor | None, bias_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and dbias (an empty tensor unless ``bias_grad``: op outputs cannot be None)."""
    # the backward always walks the tiles (a gather layout keeps them): on the H200 the
    # gather dK/dV took 172 ms against 65.5 ms for the walker's whole backward (top-k, L=32768);
    # both read the forward's lse, whichever kernel wrote it
    dq, dk, dv, dbias = sparse_attn_bwd(dout, q, k, v, out, lse, dlse, _unflatten(tiles, sizes),
                                        softmax_scale, softcap, bias, bias_grad)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


_bwd = torch.library.custom_op("blocksparse_fsa::bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, tiles, sizes, softmax_scale, softcap, bias, bias_grad):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    return (*grads, torch.empty_like(bias) if bias_grad else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, tiles, sizes, softmax_scale, softcap, bias = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, *tiles)
    ctx.sizes, ctx.softmax_scale, ctx.softcap = sizes, softmax_scale, softcap
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, bwd=_bwd):
    q, k, v, out, lse, bias, *tiles = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    bias_grad = ctx.has_bias and ctx.needs_input_grad[7]
    dq, dk, dv, dbias = bwd(dout, q, k, v, out, lse, dlse, tiles, ctx.sizes, ctx.softmax_scale,
                            ctx.softcap, bias, bias_grad)
    no_grad_tiles = [None] * len(tiles)
    return dq, dk, dv, no_grad_tiles, None, None, None, dbias if bias_grad else None


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The same forward and backward as the ops, called directly: in eager mode the op
    dispatcher cost 0.2-0.5 ms of host time per forward call on the H200 host (torch 2.11;
    395 -> 201 us without grad, 674 -> 197 us with), as much as a whole forward at L=8192."""

    @staticmethod
    def forward(q, k, v, tiles, sizes, softmax_scale, softcap, bias):
        return _fwd_impl(q, k, v, tiles, sizes, softmax_scale, softcap, bias)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv, _, *rest = _backward(ctx, dout, dlse, bwd=_bwd_impl)
        return dq, dk, dv, None, *rest


def _eager(*tensors) -> bool:
    """Plain tensors outside torch.compile and any dispatch mode (fake tensors, functionalization,
    tracing go through the ops)."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) is torch.Tensor for t in tensors))


def sparse_attn_op(q, k, v, layout: SparseLayout, softmax_scale: float, softcap: float = 0.0,
                   bias=None):
    """``(out, lse)`` of the Triton kernels over ``layout``, differentiable in q, k, v, bias and
    lse. All tensors are in the caller's token order, also for a reordered layout. A layout
    for the gather kernels runs the gather forward (the tile walker with a bias, which the
    gather kernels lack); the backward always walks the tiles."""
    check_layout_tensors(layout)
    if bias is not None and layout.gather_index is not None:
        layout = layout.with_kernel("tiles")
    tiles, sizes = _flatten(layout)
    op = _Eager.apply if _eager(q, k, v, bias) else _fwd
    return op(q, k, v, tiles, sizes, float(softmax_scale), float(softcap), bias)


# ---- layout invariants at the op boundary ---------------------------------------------------
# A layout whose tensors were written after the build, or copied with dataclasses.replace and
# new sizes, would make the kernels read past its arrays: check it before any kernel runs.
_DEBUG = os.environ.get("BLOCKSPARSE_FSA_DEBUG", "0") not in ("", "0")
# layouts whose values passed the full check, with the (address, version) of each tensor then
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_debug(enabled: bool) -> None:
    """Check every layout's shapes and values (pointer arrays, tile and token ranges) on every
    call, at the cost of one host sync per call; also on with ``BLOCKSPARSE_FSA_DEBUG=1``.
    Without it, CPU layouts are checked on every call and GPU layouts once, then again after
    any write that moves a tensor or bumps its version counter (writes through ``.data`` on a
    GPU layout are caught in debug mode only)."""
    global _DEBUG
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _DEBUG = enabled


def _layout_error(msg: str) -> ValueError:
    return ValueError(f"inconsistent layout: {msg}. Was a layout tensor written after the build, "
                      "or the layout copied with dataclasses.replace and new sizes? Build it "
                      "again (build_layout, a patterns builder or layout.to)")


def check_layout_tensors(layout: SparseLayout) -> None:
    """Raise ``ValueError`` unless ``layout``'s tensors fit its sizes (see :func:`set_debug`
    for when their values are checked too). Skipped while ``torch.compile`` traces."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return
    if layout.device.type == "cpu" or _DEBUG:
        _check_shapes(layout)
        _check_values(layout)
        return
    stamp = _stamp(layout)
    if _CHECKED.get(layout) != stamp:
        _check_shapes(layout)
        _check_values(layout)
        _CHECKED[layout] = stamp


def trust_layout(layout: SparseLayout) -> None:
    """Skip the first-call value check of a layout this library just built (the check exists
    for layouts edited after their build; on a GPU it costs a host sync)."""
    _CHECKED[layout] = _stamp(layout)


def _stamp(layout):
    """Each tensor's address and version counter: one of them changes when a tensor is
    written in place, resized or given new data (inference tensors have no version)."""
    tensors = [getattr(layout, name) for name in _TILE_FIELDS]
    if layout.is_reordered:
        tensors += [layout.q_perm, layout.k_perm]
    if layout.gather_index is not None:
        tensors += [layout.gather_index.row_ptr, layout.gather_index.col]
    try:
        versions = [t._version for t in tensors]
    except RuntimeError:  # an inference tensor
        versions = None
    return [t.data_ptr() for t in tensors], versions


def _check_shapes(layout: SparseLayout) -> None:
    groups = layout.batch * layout.heads
    n_qt, n_kt = layout.num_q_tiles, layout.num_k_tiles
    if layout.block_m not in (16, 32, 64, 128, 256) or layout.block_n not in (16, 32, 64, 128,
                                                                              256):
        raise _layout_error(f"block {layout.block_m}x{layout.block_n} is not a supported size")
    want = {"full_ptr": (groups * n_qt + 1,), "part_ptr": (groups * n_qt + 1,),
            "full_ptr_t": (groups * n_kt + 1,), "part_ptr_t": (groups * n_kt + 1,),
            "full_col": (layout.full_col.numel(),), "full_row_t": (layout.full_col.numel(),),
            "part_col": (layout.part_col.numel(),), "part_row_t": (layout.part_col.numel(),),
            "part_mask_t": (layout.part_col.numel(),),
            "masks": (layout.part_col.numel(), layout.block_m, -(-layout.block_n // 32))}
    if layout.is_reordered:
        want.update(q_perm=(layout.q_len,), k_perm=(layout.k_len,))
    for name, shape in want.items():
        t = getattr(layout, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise _layout_error(f"{name} has shape {got}, expected {shape} for batch="
                                f"{layout.batch}, heads={layout.heads}, q_len={layout.q_len}, "
                                f"k_len={layout.k_len}, block {layout.block_m}x{layout.block_n}")
        if t.device != layout.device:
            raise _layout_error(f"{name} is on {t.device}, the layout on {layout.device}")
        if t.dtype not in ((torch.int32,) if name == "masks" else (torch.int32, torch.int64)):
            raise _layout_error(f"{name} has dtype {t.dtype}")
    gi = layout.gather_index
    if gi is not None:
        sizes = (gi.q_len, gi.k_len, gi.batch, gi.heads)
        if sizes != (layout.q_len, layout.k_len, layout.batch, layout.heads) \
                or gi.row_ptr.shape != (groups * layout.q_len + 1,) or gi.col.dim() != 1 \
                or gi.device != layout.device:
            raise _layout_error(f"its gather index (q_len, k_len, batch, heads = {sizes}) does "
                                "not fit the layout")


def _check_values(layout: SparseLayout) -> None:
    """One pass over the pointer arrays and entries, one host sync."""
    n_qt, n_kt, n_part = layout.num_q_tiles, layout.num_k_tiles, layout.num_partial_tiles
    lists = [("full_ptr", "full_col", n_kt), ("part_ptr", "part_col", n_kt),
             ("full_ptr_t", "full_row_t", n_qt), ("part_ptr_t", "part_row_t", n_qt),
             (None, "part_mask_t", n_part)]
    if layout.is_reordered:
        lists += [(None, "q_perm", layout.q_len), (None, "k_perm", layout.k_len)]
    tensors = {name: getattr(layout, name) for _, name, _ in lists}
    tensors.update({ptr: getattr(layout, ptr) for ptr, _, _ in lists if ptr})
    if layout.gather_index is not None:
        lists.append(("gather.row_ptr", "gather.col", layout.k_len))
        tensors.update({"gather.row_ptr": layout.gather_index.row_ptr,
                        "gather.col": layout.gather_index.col})
    problems, oks = [], []
    for ptr_name, name, hi in lists:
        entries = tensors[name]
        if ptr_name is not None:
            ptr = tensors[ptr_name].long()
            problems.append(f"{ptr_name} must rise from 0 to {name}'s length {entries.numel()}")
            oks.append((ptr[0] == 0) & (ptr[-1] == entries.numel())
                       & (ptr[1:] >= ptr[:-1]).all())
        problems.append(f"{name} must lie in [0, {hi})")
        oks.append(((entries >= 0) & (entries < hi)).all() if entries.numel()
                   else torch.ones((), dtype=torch.bool, device=entries.device))
    for problem, ok in zip(problems, torch.stack(oks).tolist()):
        if not ok:
            raise _layout_error(problem)
