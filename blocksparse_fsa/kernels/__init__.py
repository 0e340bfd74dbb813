"""Triton kernels and their launchers."""

from .bwd import sparse_attn_bwd
from .fwd import sparse_attn_fwd

__all__ = ["sparse_attn_bwd", "sparse_attn_fwd"]
