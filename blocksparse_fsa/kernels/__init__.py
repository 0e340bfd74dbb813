"""Triton kernels and their launchers."""

from .bwd import sparse_attn_bwd
from .common import poison_outputs
from .fwd import sparse_attn_fwd
from .gather import gather_attn_bwd, gather_attn_bwd_dkdv, gather_attn_fwd

__all__ = ["gather_attn_bwd", "gather_attn_bwd_dkdv", "gather_attn_fwd", "poison_outputs",
           "sparse_attn_bwd", "sparse_attn_fwd"]
