"""Token permutations that turn scattered-but-regular patterns into dense tiles.

A permuted layout describes attention between ``q[:, q_perm]`` and ``k[:, k_perm]``;
``sparse_attn_func`` gathers the inputs into that order, runs the kernels and scatters the
outputs (and, through autograd, the gradients) back, so the caller never sees the order.

- ``dilation_order(length, dilation)``: the NATTEN idea. A dilated window (keys i, i-d, i-2d,
  ...) only pairs tokens with the same residue ``i % d``; grouping tokens by residue makes each
  group a plain sliding window, i.e. dense tiles.
- ``rcm_order(layout)``: scipy's reverse Cuthill-McKee on the union of the layout's
  (symmetrised) patterns, for arbitrary patterns with Lq == Lk: it reduces the bandwidth, so
  active pairs gather near the diagonal.
"""

from __future__ import annotations

import numpy as np
import torch

from .core import inverse

__all__ = ["check_permutation", "dilation_of", "dilation_order", "inverse", "permute_indices",
           "rcm_order"]


def dilation_order(length: int, dilation: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """Positions sorted by ``(position + offset) % dilation`` (stable): residue 0 first, ...

    ``offset = k_len - q_len`` aligns query positions with key positions bottom-right.
    """
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    pos = torch.arange(length, device=device)
    return torch.sort((pos + offset) % dilation, stable=True).indices


def dilation_of(q_perm: torch.Tensor, k_perm: torch.Tensor, block_m: int, block_n: int) -> int:
    """``d`` if ``(q_perm, k_perm)`` are the orders of ``reorder=("dilation", d)`` with residue
    groups of whole tiles (``Lq / d`` a multiple of ``block_m``, ``Lk / d`` of ``block_n``): the
    kernels then compute the order per tile instead of reading it. Else 0."""
    q_len, k_len = q_perm.numel(), k_perm.numel()
    if k_len < 2 or q_len < 1:
        return 0
    d = int(k_perm[1])  # dilation_order(k_len, d) starts 0, d, 2d, ... (or 0, 1 if d == k_len)
    if d < 1 or q_len % (d * block_m) or k_len % (d * block_n):
        return 0
    same = (torch.equal(k_perm.cpu(), dilation_order(k_len, d))
            and torch.equal(q_perm.cpu(), dilation_order(q_len, d, offset=k_len - q_len)))
    return d if same else 0


def rcm_order(layout) -> torch.Tensor:
    """Reverse Cuthill-McKee order of the union over (batch, head) of ``layout``'s pattern,
    symmetrised (``A | A^T``); needs ``q_len == k_len``. O(nnz) memory (scipy sparse)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    from ..reference import layout_pairs  # (reference imports layout.core: not at the top)

    if layout.q_len != layout.k_len:
        raise ValueError(f"reorder='rcm' needs q_len == k_len, got {layout.q_len} and "
                         f"{layout.k_len}")
    _, i, j = (t.cpu().numpy() for t in layout_pairs(layout))
    n = layout.q_len
    graph = sp.coo_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    graph = ((graph + graph.T) > 0).astype(np.int8).tocsr()
    return torch.from_numpy(reverse_cuthill_mckee(graph, symmetric_mode=True).astype(np.int64))


def check_permutation(name: str, perm, length: int) -> torch.Tensor:
    """Validate a user permutation of ``range(length)`` and return it as int64."""
    if not isinstance(perm, torch.Tensor) or perm.dtype.is_floating_point or perm.dim() != 1:
        raise TypeError(f"{name} must be a 1-D integer tensor")
    if perm.numel() != length:
        raise ValueError(f"{name} must have {length} entries, got {perm.numel()}")
    perm = perm.long()
    seen = torch.zeros(length, dtype=torch.bool, device=perm.device)
    if length and (perm.min() < 0 or perm.max() >= length):
        raise ValueError(f"{name} must be a permutation of range({length})")
    seen[perm] = True
    if not bool(seen.all()):
        raise ValueError(f"{name} must be a permutation of range({length})")
    return perm


def permute_indices(attn_indices: torch.Tensor, k_len: int, is_causal: bool,
                    q_perm: torch.Tensor, k_perm: torch.Tensor) -> torch.Tensor:
    """Indices of the permuted problem: row ``i'`` lists ``k_inv[j]`` for the keys ``j`` of
    original query ``q_perm[i']``. Causality is applied first, on the original positions."""
    idx = attn_indices.long()
    q_len = idx.shape[2]
    if is_causal:
        rows = torch.arange(q_len, device=idx.device)[:, None]
        idx = torch.where(idx <= rows + (k_len - q_len), idx, -1)
    idx = idx.index_select(2, q_perm.to(idx.device))
    k_inv = inverse(k_perm.to(idx.device))
    return torch.where(idx >= 0, k_inv[idx.clamp(min=0)], -1)
