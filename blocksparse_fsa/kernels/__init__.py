"""Triton kernels and their launchers."""

from .bwd import sparse_attn_bwd
from .fwd import sparse_attn_fwd
from .gather import gather_attn_bwd, gather_attn_fwd

__all__ = ["gather_attn_bwd", "gather_attn_fwd", "sparse_attn_bwd", "sparse_attn_fwd"]
