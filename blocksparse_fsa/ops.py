"""The Triton forward and backward as ``torch.library`` custom ops.

``torch.compile`` treats each op as one opaque call whose output shapes come from the fake
implementations below, so a model calling ``sparse_attn_func(..., layout=layout)`` compiles
with ``fullgraph=True``. A ``SparseLayout`` is not a type an op signature can carry: it travels
as its tile tensors plus its integer sizes, and the op rebuilds it on the other side.
"""

from __future__ import annotations

import torch

from .kernels import sparse_attn_bwd, sparse_attn_fwd
from .layout import SparseLayout

# the tensors and sizes of a SparseLayout that the kernels read (the token permutation travels
# as two optional tensors); not causality (already in the tiles) or nnz, so that torch.compile
# does not specialise a graph on them
_TILE_FIELDS = ("full_ptr", "full_col", "part_ptr", "part_col", "masks",
                "full_ptr_t", "full_row_t", "part_ptr_t", "part_row_t", "part_mask_t")
_PERM_FIELDS = ("q_perm", "k_perm")
_SIZE_FIELDS = ("q_len", "k_len", "block_m", "block_n", "batch", "heads")


def _flatten(layout: SparseLayout):
    """``tiles`` (the tile tensors, then q_perm and k_perm if reordered) and ``sizes``."""
    names = _TILE_FIELDS + (_PERM_FIELDS if layout.is_reordered else ())
    return [getattr(layout, f) for f in names], [int(getattr(layout, f)) for f in _SIZE_FIELDS]


def _unflatten(tiles, sizes) -> SparseLayout:
    """The kernels' view of a layout (``is_causal`` and ``nnz`` are placeholders)."""
    return SparseLayout(**dict(zip(_SIZE_FIELDS, sizes)),
                        **dict(zip(_TILE_FIELDS + _PERM_FIELDS, tiles)), is_causal=False, nnz=0)


@torch.library.custom_op("blocksparse_fsa::fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: list[torch.Tensor],
         sizes: list[int], softmax_scale: float, softcap: float,
         bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_attn_fwd(q, k, v, _unflatten(tiles, sizes), softmax_scale, softcap, bias)


@_fwd.register_fake
def _(q, k, v, tiles, sizes, softmax_scale, softcap, bias):
    batch, q_len, num_q_heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(batch, num_q_heads, q_len, dtype=torch.float32))


@torch.library.custom_op("blocksparse_fsa::bwd", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
         tiles: list[torch.Tensor], sizes: list[int], softmax_scale: float, softcap: float,
         bias: torch.Tensor | None, bias_grad: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and dbias (an empty tensor unless ``bias_grad``: op outputs cannot be None)."""
    dq, dk, dv, dbias = sparse_attn_bwd(dout, q, k, v, out, lse, dlse, _unflatten(tiles, sizes),
                                        softmax_scale, softcap, bias, bias_grad)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


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


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, *tiles = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    bias_grad = ctx.has_bias and ctx.needs_input_grad[7]
    dq, dk, dv, dbias = _bwd(dout, q, k, v, out, lse, dlse, tiles, ctx.sizes, ctx.softmax_scale,
                             ctx.softcap, bias, bias_grad)
    no_grad_tiles = [None] * len(tiles)
    return dq, dk, dv, no_grad_tiles, None, None, None, dbias if bias_grad else None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def sparse_attn_op(q, k, v, layout: SparseLayout, softmax_scale: float, softcap: float = 0.0,
                   bias=None):
    """``(out, lse)`` of the Triton kernels over ``layout``, differentiable in q, k, v, bias and
    lse. All tensors are in the caller's token order, also for a reordered layout."""
    tiles, sizes = _flatten(layout)
    return _fwd(q, k, v, tiles, sizes, float(softmax_scale), float(softcap), bias)
