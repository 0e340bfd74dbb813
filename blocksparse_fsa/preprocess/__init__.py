"""Preprocessing: patterns (indices, dense masks, dense attention) -> tile metadata."""

from .dense import causal_mask, dense_to_tiles, mask_to_tiles, pack_bits
from .indices import indices_to_tiles

__all__ = ["causal_mask", "dense_to_tiles", "indices_to_tiles", "mask_to_tiles", "pack_bits"]
