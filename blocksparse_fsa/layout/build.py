"""Building a :class:`SparseLayout`: from per-query indices, dense masks and predicates, and
the choice of kernel (the tile walker or the gather forward).

The index builds have three back ends with identical results: ``preprocess.numba`` (CPU;
numba is imported, and its functions compiled, on the first build that uses it), ``preprocess.torch``
(any device) and ``preprocess.triton`` (CUDA).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from ..preprocess.dense import dense_to_tiles, mask_to_tiles
from ..preprocess.predicate import DEFAULT_CHUNK_PAIRS, predicate_to_tiles
from ..preprocess.torch import index_range_error, indices_to_tiles_torch
from .core import SparseLayout, check_blocks, layout_from_tiles
from .gather_index import build_gather_index
from .reorder import (check_permutation, dilation_of, dilation_order, permute_indices,
                      rcm_order)

KERNELS = ("auto", "tiles", "gather")
# kernel="auto" picks the gather forward below this tile density (useful / computed pairs):
# where the H200 measurements put the crossing of the two forwards (benchmarks/NOTES.md).
GATHER_MAX_DENSITY = 0.08
METHODS = ("auto", "numba", "torch", "triton")
# Smaller CPU index tensors build with PyTorch until numba is loaded: numba's first compile on
# a machine (10-60 s) costs more than PyTorch's slower build of a small input.
NUMBA_MIN_INDICES = 2**18
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

Predicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TileMap = torch.Tensor | Callable[[int, int], torch.Tensor] | None


def build_layout(attn_indices: torch.Tensor, k_len: int, *, is_causal: bool = False,
                 block_m: int | None = None, block_n: int | None = None,
                 reorder=None, method: str = "auto", kernel: str = "auto") -> SparseLayout:
    """Build the tile layout of ``attn_indices`` once; reuse it for every layer and the backward.

    ``attn_indices``: integer tensor ``(B|1, H|1, Lq, W)``, entries in ``[-1, k_len)``, ``-1`` =
    unused slot, duplicates count once, order within a row is free. ``is_causal`` drops every
    index ``j > i + k_len - Lq`` (bottom-right aligned). Every method costs O(Lq * W) per
    (batch, head) and returns the same layout, tensor for tensor, on ``attn_indices``' device.
    ``method``: ``"numba"`` (the CPU preprocessor), ``"triton"`` (two Triton kernels on the
    indices' GPU, reading the indices about once: for indices a router or top-k selector just
    produced), ``"torch"`` (PyTorch on the indices' device, chunked: a slower fallback for any
    device) or ``"auto"`` (triton for CUDA indices; numba for CPU ones from ``NUMBA_MIN_INDICES``
    entries on, or once numba is loaded, torch below that and on other devices).
    ``reorder``: an optional token permutation that makes scattered patterns tile-dense, see
    :func:`reordered`.
    ``kernel``: ``"tiles"``, ``"gather"`` or ``"auto"`` (gather for scattered patterns), see
    :func:`with_kernel`; a reordered layout always takes the tile walker.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if reorder is not None:
        _check_indices(attn_indices, k_len)
        q_perm, k_perm = _token_orders(
            reorder, attn_indices.shape[2], k_len,
            lambda: build_layout(attn_indices, k_len, is_causal=is_causal, block_m=block_m,
                                 block_n=block_n, method=method, kernel="tiles"))
        layout = _permuted(attn_indices, k_len, is_causal, block_m, block_n, q_perm, k_perm,
                           method)
        return with_kernel(layout, kernel)  # "gather" is an error here, "auto" the walker
    block_m, block_n = check_blocks(block_m, block_n)
    idx = _check_indices(attn_indices, k_len, check_range=False)
    if method == "auto":
        method = _auto_method(idx)
    if method != "triton":  # the Triton kernels check the range in the same pass
        _check_range(idx, k_len)
    n_b, n_h, q_len, _ = idx.shape
    meta = (q_len, int(k_len), block_m, block_n, n_b, n_h, bool(is_causal))
    if method == "triton":  # every tensor on the GPU, the transposed lists included
        from ..preprocess.triton import layout_tensors_triton
        tensors, nnz = layout_tensors_triton(idx, q_len, int(k_len), bool(is_causal),
                                             block_m, block_n)
        layout = SparseLayout(q_len=q_len, k_len=int(k_len), block_m=block_m, block_n=block_n,
                              batch=n_b, heads=n_h, is_causal=bool(is_causal), nnz=nnz,
                              **tensors)
        return with_kernel(layout, kernel)
    if method == "torch":
        arrays = indices_to_tiles_torch(idx, q_len, int(k_len), bool(is_causal), block_m,
                                        block_n)
    else:
        from ..preprocess.numba import indices_to_tiles  # numba loads on the first CPU build
        arrays = indices_to_tiles(np.ascontiguousarray(idx.cpu().numpy()), q_len, int(k_len),
                                  bool(is_causal), block_m, block_n)
        arrays = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in arrays]
        arrays[4] = arrays[4].view(torch.int32)  # uint32 words -> int32 bit patterns
    return with_kernel(layout_from_tiles(*meta, *arrays).to(attn_indices.device), kernel)


def _auto_method(idx: torch.Tensor) -> str:
    if idx.device.type == "cuda":
        return "triton"
    if idx.device.type == "cpu" and (idx.numel() >= NUMBA_MIN_INDICES
                                     or "blocksparse_fsa.preprocess.numba" in sys.modules):
        return "numba"
    return "torch"


def layout_from_dense_mask(attn_mask: torch.Tensor, *, is_causal: bool = False,
                           block_m: int | None = None, block_n: int | None = None,
                           q_len: int | None = None, k_len: int | None = None) -> SparseLayout:
    """Layout of a dense boolean mask ``(B|1, H|1, Lq|1, Lk|1)`` (True = attend).

    A size-1 query or key dim broadcasts (FSA's rules: ``(B, 1, 1, Lk)`` is a key-padding
    mask); then pass ``q_len`` / ``k_len``, and the layout is built from the mask's rows
    and columns without expanding it to Lq x Lk. The reduction to tiles runs on the
    mask's device; the result lives there too.
    """
    block_m, block_n = check_blocks(block_m, block_n)
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        raise TypeError("attn_mask must be a torch.bool tensor (True = attend), got "
                        f"{getattr(attn_mask, 'dtype', type(attn_mask))}")
    if attn_mask.dim() != 4:
        raise ValueError("attn_mask must have shape (batch, heads, q_len, k_len), got "
                         f"{tuple(attn_mask.shape)}")
    n_b, n_h, mask_q, mask_k = attn_mask.shape
    q_len = mask_q if q_len is None else q_len
    k_len = mask_k if k_len is None else k_len
    for name, size, length in (("query", mask_q, q_len), ("key", mask_k, k_len)):
        if size not in (1, length):
            raise ValueError(f"attn_mask has {size} {name} positions; expected 1 or {length}")
    if (mask_q, mask_k) != (q_len, k_len):
        return _broadcast_mask_layout(attn_mask, q_len, k_len, bool(is_causal), block_m,
                                      block_n)
    arrays = mask_to_tiles(attn_mask, bool(is_causal), block_m, block_n)
    layout = layout_from_tiles(q_len, k_len, block_m, block_n, n_b, n_h, bool(is_causal), *arrays)
    return layout.to(attn_mask.device)


def dense_layout(q_len: int, k_len: int, *, is_causal: bool = False, block_m: int | None = None,
                 block_n: int | None = None, device="cpu") -> SparseLayout:
    """Layout of dense attention (causal if asked), built without a dense mask."""
    block_m, block_n = check_blocks(block_m, block_n)
    arrays = dense_to_tiles(q_len, k_len, bool(is_causal), block_m, block_n, device)
    layout = layout_from_tiles(q_len, k_len, block_m, block_n, 1, 1, bool(is_causal), *arrays)
    return layout.to(device)


def with_kernel(layout: SparseLayout, kernel: str) -> SparseLayout:
    """``layout`` for the tile walker (``"tiles"``), the gather forward (``"gather"``: each
    query loads its own keys, for scattered patterns; adds a :class:`GatherIndex` of 4
    bytes per active pair; the backward still walks the tiles) or whichever fits
    (``"auto"``: gather below ``GATHER_MAX_DENSITY`` tile density, for layouts without a
    token permutation)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = ("gather" if layout.density < GATHER_MAX_DENSITY and not layout.is_reordered
                  else "tiles")
    if kernel == layout.kernel:
        return layout
    if kernel == "tiles":
        return replace(layout, gather_index=None)
    if layout.is_reordered:
        raise ValueError("the gather kernels take layouts without a token permutation: a "
                         "reordered layout is meant for the tile walker")
    return replace(layout, gather_index=build_gather_index(layout, transposed=False))


def reordered(layout: SparseLayout, reorder) -> SparseLayout:
    """``layout``'s pattern with its tokens permuted so that its active pairs fill fewer tiles.

    ``reorder`` is ``("dilation", d)`` (group tokens by position mod d, query positions
    bottom-right aligned: a dilated window becomes d plain windows), ``"rcm"`` (scipy's
    reverse Cuthill-McKee on the symmetrised pattern; needs q_len == k_len), or a pair of
    permutations ``(q_perm, k_perm)``. Outputs and gradients of ``sparse_attn_func`` stay
    in the callers' order. The permuted tiles are built from per-query indices
    (``to_indices()``): O(q_len * W) memory.
    """
    if layout.is_reordered:
        raise ValueError("this layout is already reordered; reorder layout.unordered()")
    q_perm, k_perm = _token_orders(reorder, layout.q_len, layout.k_len, lambda: layout)
    return _permuted(layout.to_indices(), layout.k_len, layout.is_causal, layout.block_m,
                     layout.block_n, q_perm, k_perm)


def layout_from_predicate(q_len: int, k_len: int, predicate: Predicate,
                          tile_candidates: TileMap = None, *, batch: int = 1, heads: int = 1,
                          is_causal: bool = False, block_m: int | None = None,
                          block_n: int | None = None, device="cpu", full_tiles: TileMap = None,
                          chunk_pairs: int = DEFAULT_CHUNK_PAIRS) -> SparseLayout:
    """Layout of the pairs where ``predicate(b, h, q_idx, k_idx)`` is True.

    Args:
        predicate: a vectorised ``mask_mod`` as in FlexAttention. It receives int64 tensors
            ``b``, ``h`` ``[T, 1, 1]``, ``q_idx`` ``[T, block_m, 1]``, ``k_idx`` ``[T, 1,
            block_n]`` (always inside ``[0, q_len)`` / ``[0, k_len)``: edge tiles' padding is
            clamped, then masked off) and returns a bool tensor broadcastable to ``[T, block_m,
            block_n]``. ``b`` / ``h`` are the layout's batch and head indices.
        tile_candidates: bool ``[QT, KT]``, ``[H|1, QT, KT]`` or ``[B|1, H|1, QT, KT]`` (``QT =
            ceil(q_len / block_m)``, ``KT = ceil(k_len / block_n)``): the tiles that MAY hold
            an active pair, computed analytically; the predicate runs on these tiles only, so a
            tile left out is empty whatever the predicate says. A callable ``(block_m,
            block_n) -> map`` is accepted too; None means every tile (O(Lq * Lk) work).
        batch, heads: the layout's batch and head counts (1 = broadcast).
        is_causal: AND ``k_idx <= q_idx + k_len - q_len`` and record it on the layout.
        full_tiles: optional map like ``tile_candidates`` of tiles on which the predicate is
            True for every in-range pair; those that are in range (and causal-full) are taken
            as full without evaluating the predicate. Tiles outside ``tile_candidates`` are
            ignored. A wrong hint gives a wrong layout: it is a promise, not a test.
        chunk_pairs: at most this many (query, key) pairs go to one predicate call.

    Tiles are classified exactly as ``SparseLayout.from_dense_mask`` does: empty, full (every
    pair active and the tile wholly inside ``[0, Lq) x [0, Lk)``) or partial (bit-packed).
    """
    block_m, block_n = check_blocks(block_m, block_n)
    q_len, k_len = check_int("q_len", q_len, 1), check_int("k_len", k_len, 1)
    batch, heads = check_int("batch", batch, 1), check_int("heads", heads, 1)
    chunk_pairs = check_int("chunk_pairs", chunk_pairs, 1)
    if not callable(predicate):
        raise TypeError(f"predicate must be callable, got {type(predicate).__name__}")
    device = torch.device(device)
    shape = (batch, heads, -(-q_len // block_m), -(-k_len // block_n))
    candidates = tile_map("tile_candidates", tile_candidates, shape, block_m, block_n, device)
    full = (None if full_tiles is None else
            tile_map("full_tiles", full_tiles, shape, block_m, block_n, device))
    arrays = predicate_to_tiles(q_len, k_len, predicate, candidates, full, bool(is_causal),
                                block_m, block_n, chunk_pairs)
    layout = layout_from_tiles(q_len, k_len, block_m, block_n, batch, heads, bool(is_causal),
                               *arrays)
    return layout.to(device)


def _broadcast_mask_layout(mask, q_len, k_len, is_causal, block_m, block_n):
    """Layout of a mask with a size-1 query and/or key dim, from its rows and columns only:
    a tile may be active where its rows and its columns both have an active entry, and is
    full where all of them are."""
    n_b, n_h, mask_q, mask_k = mask.shape

    def per_tile(values, length, block, broadcast):  # [B, H, L|1] -> [B, H, tiles|1] x2
        if broadcast:
            return values, values
        n = -(-length // block)
        padded = torch.nn.functional.pad(values, (0, n * block - length))
        tiles = padded.view(n_b, n_h, n, block)
        return tiles.any(-1), tiles.all(-1)

    rows_any, rows_all = per_tile(mask.any(-1), q_len, block_m, mask_q == 1)
    cols_any, cols_all = per_tile(mask.any(-2), k_len, block_n, mask_k == 1)
    if mask_q == 1:  # any column active means every query row sees it
        rows_any = rows_all = torch.ones_like(rows_any)
    if mask_k == 1:
        cols_any = cols_all = torch.ones_like(cols_any)
    n_qt, n_kt = -(-q_len // block_m), -(-k_len // block_n)
    may = (rows_any[..., :, None] & cols_any[..., None, :]).expand(n_b, n_h, n_qt, n_kt)
    full = (rows_all[..., :, None] & cols_all[..., None, :]).expand(n_b, n_h, n_qt, n_kt)
    if mask_q == 1 and mask_k == 1:
        may = full = mask.expand(n_b, n_h, n_qt, n_kt)

    def predicate(b, h, q, k):
        return mask[b, h, q if mask_q > 1 else 0, k if mask_k > 1 else 0]

    return layout_from_predicate(q_len, k_len, predicate, may, batch=n_b, heads=n_h,
                                 is_causal=is_causal, block_m=block_m, block_n=block_n,
                                 device=mask.device, full_tiles=full)


def _token_orders(reorder, q_len, k_len, unordered_layout):
    """``(q_perm, k_perm)`` of a ``reorder`` spec (see :func:`reordered`);
    ``unordered_layout()`` gives the pattern's layout, built only when RCM needs it."""
    if isinstance(reorder, str) and reorder == "rcm":
        perm = rcm_order(unordered_layout())
        return perm, perm
    if isinstance(reorder, tuple) and len(reorder) == 2 and reorder[0] == "dilation":
        return (dilation_order(q_len, reorder[1], offset=k_len - q_len),
                dilation_order(k_len, reorder[1]))
    if isinstance(reorder, tuple) and len(reorder) == 2:
        return (check_permutation("q_perm", reorder[0], q_len),
                check_permutation("k_perm", reorder[1], k_len))
    raise ValueError(f"reorder must be 'rcm', ('dilation', d) or (q_perm, k_perm), got "
                     f"{reorder!r}")


def _permuted(attn_indices, k_len, is_causal, block_m, block_n, q_perm, k_perm, method="auto"):
    """The layout of ``attn_indices`` with its tokens in the order ``q_perm`` / ``k_perm``."""
    dev = attn_indices.device
    idx = permute_indices(attn_indices, k_len, is_causal, q_perm.to(dev), k_perm.to(dev))
    layout = build_layout(idx, k_len, block_m=block_m, block_n=block_n, method=method,
                          kernel="tiles")
    dilation = dilation_of(q_perm, k_perm, layout.block_m, layout.block_n)
    return replace(layout, is_causal=bool(is_causal), q_perm=q_perm.to(layout.device),
                   k_perm=k_perm.to(layout.device), perm_dilation=dilation)


def check_int(name, value, minimum=0) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def tile_map(name, value, shape, block_m, block_n, device) -> torch.Tensor:
    """A user's tile map as a bool ``[batch, heads, QT, KT]`` view on ``device``."""
    if value is None:
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device).expand(shape)
    if callable(value):
        value = value(block_m, block_n)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    if not 2 <= value.dim() <= 4:
        raise ValueError(f"{name} must have shape [QT, KT], [H, QT, KT] or [B, H, QT, KT], got "
                         f"{tuple(value.shape)}")
    value = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
    n_b, n_h, n_qt, n_kt = shape
    if (tuple(value.shape[2:]) != (n_qt, n_kt) or value.shape[0] not in (1, n_b)
            or value.shape[1] not in (1, n_h)):
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected [1|{n_b}, 1|{n_h}, "
                         f"{n_qt}, {n_kt}] for block_m={block_m}, block_n={block_n}")
    return value.to(device).expand(shape)


def _check_indices(attn_indices, k_len, check_range=True) -> torch.Tensor:
    """Validate ``attn_indices`` (its entries too if ``check_range``); return it detached as
    int32 or int64, on its device."""
    if not isinstance(attn_indices, torch.Tensor):
        raise TypeError(f"attn_indices must be a torch.Tensor, got {type(attn_indices).__name__}")
    if attn_indices.dtype not in _INT_DTYPES:
        raise TypeError(f"attn_indices must be an integer tensor, got {attn_indices.dtype}")
    if attn_indices.dim() != 4:
        raise ValueError("attn_indices must have shape (batch, kv_heads, q_len, window), got "
                         f"{tuple(attn_indices.shape)}")
    if not isinstance(k_len, (int, np.integer)) or isinstance(k_len, bool) or k_len < 0:
        raise ValueError(f"k_len must be a non-negative int, got {k_len!r}")
    idx = attn_indices.detach()
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int32)
    if check_range:
        _check_range(idx, k_len)
    return idx


def _check_range(idx, k_len):
    """Entries of ``idx`` in ``[-1, k_len)`` (one read of the indices and one sync)."""
    if idx.numel():
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()
        if lo < -1 or hi >= k_len:
            raise index_range_error(idx, k_len)
