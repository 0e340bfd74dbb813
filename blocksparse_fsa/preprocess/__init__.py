"""Floor 1: attention patterns (indices, dense masks, predicates) -> tile lists.

``dense`` (masks and dense attention), ``predicate`` (FlexAttention-style ``mask_mod``),
``torch`` (per-query indices, any device), ``numba`` (per-query indices on the CPU; imports
numba, so nothing imports it until the first CPU build) and ``triton`` (per-query indices on
a CUDA GPU). Nothing here imports a module above it.
"""

from .dense import causal_mask, dense_to_tiles, mask_to_tiles, pack_bits

__all__ = ["causal_mask", "dense_to_tiles", "mask_to_tiles", "pack_bits"]
