"""``GatherIndex``: a pattern's exact (query, key) pairs as token-level CSR lists, for the
gather kernels (``kernels/gather.py``) that load each query's own keys instead of walking tiles.

Scattered token-level patterns (random top-k of a causal prefix, dilated windows) touch almost
every tile at a few percent density; the tile walker then does dense work for sparse results.
The gather kernels do work in proportion to the pairs (``nnz``) instead. ``gather_stats`` gives
the numbers that decide between the two paths.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..preprocess.torch import transpose_csr_torch
from .convert import layout_csr
from .core import GatherIndex, SparseLayout

__all__ = ["GatherIndex", "build_gather_index", "gather_stats"]


def build_gather_index(layout: SparseLayout, transposed: bool = True) -> GatherIndex:
    """The :class:`GatherIndex` of ``layout``'s exact pattern, on the layout's device.

    PyTorch only: ``convert.layout_csr`` decodes the tiles into the query-row CSR
    (O(nnz + tiles * block_m) memory), then, if ``transposed`` (needed by ``gather_attn_bwd``
    only), each group's pairs are transposed with one stable sort (temporaries O(nnz of one
    group)). Build it once per batch, next to the layout.
    """

    if not isinstance(layout, SparseLayout):
        raise TypeError(f"layout must be a SparseLayout, got {type(layout).__name__}")
    row_ptr, col = layout_csr(layout)  # int64, keys ascending and unique per row
    index = GatherIndex(q_len=layout.q_len, k_len=layout.k_len, batch=layout.batch,
                        heads=layout.heads, is_causal=layout.is_causal,
                        row_ptr=row_ptr.contiguous(), col=col.to(torch.int32))
    return _with_transpose(index) if transposed else index


def _with_transpose(index: GatherIndex) -> GatherIndex:
    q_len, k_len, n_groups = index.q_len, index.k_len, index.batch * index.heads
    row_ptr, col = index.row_ptr, index.col
    row_ptr_t = torch.zeros(n_groups * k_len + 1, dtype=torch.long, device=index.device)
    row_t = torch.empty(col.numel(), dtype=torch.int32, device=index.device)
    bounds = row_ptr[::q_len].tolist() if q_len else [0] * (n_groups + 1)
    for g in range(n_groups):
        start, stop = bounds[g], bounds[g + 1]
        ptr = row_ptr[g * q_len:(g + 1) * q_len + 1] - start
        ptr_t, rows, _ = transpose_csr_torch(ptr, col[start:stop], 1, q_len, k_len)
        row_ptr_t[g * k_len + 1:(g + 1) * k_len + 1] = ptr_t[1:] + start
        row_t[start:stop] = rows
    return replace(index, row_ptr_t=row_ptr_t, row_t=row_t)


def gather_stats(layout: SparseLayout, gidx: GatherIndex | None = None, *, block_n: int = 64,
                 block_q: int = 16) -> dict:
    """Numbers to choose between the tile walker and the gather kernels for one pattern.

    Per layout group summed over the layout's batch and heads (multiply by the query heads per
    layout head for a model's total):

    - ``nnz``: active pairs; ``tiles``: tiles the walker visits; ``tile_pairs``: the pairs it
      computes (``tiles * block_m * block_n``); ``tile_density`` = nnz / tile_pairs;
    - ``gather_slots_fwd``: key slots the forward and dQ load, each query's list padded to
      whole chunks of ``block_n``; ``gather_density_fwd`` = nnz / that;
    - ``gather_slots_dkdv``: query slots dK/dV load, each key's list padded to ``block_q``;
    - ``keys_per_query_mean`` / ``_max``, ``queries_per_key_max``, ``empty_queries``.
    """
    gidx = build_gather_index(layout) if gidx is None or gidx.row_t is None else gidx
    per_q = (gidx.row_ptr[1:] - gidx.row_ptr[:-1])
    per_k = (gidx.row_ptr_t[1:] - gidx.row_ptr_t[:-1])
    slots_fwd = int((-(-per_q // block_n) * block_n).sum()) if per_q.numel() else 0
    slots_dkdv = int((-(-per_k // block_q) * block_q).sum()) if per_k.numel() else 0
    tile_pairs = layout.num_tiles * layout.block_m * layout.block_n
    nnz = gidx.nnz
    return dict(
        nnz=nnz, tiles=layout.num_tiles, tile_pairs=tile_pairs, tile_density=layout.density,
        gather_slots_fwd=slots_fwd, gather_density_fwd=nnz / slots_fwd if slots_fwd else 1.0,
        gather_slots_dkdv=slots_dkdv,
        gather_density_dkdv=nnz / slots_dkdv if slots_dkdv else 1.0,
        keys_per_query_mean=nnz / per_q.numel() if per_q.numel() else 0.0,
        keys_per_query_max=int(per_q.max()) if per_q.numel() else 0,
        queries_per_key_max=int(per_k.max()) if per_k.numel() else 0,
        empty_queries=int((per_q == 0).sum()),
    )
