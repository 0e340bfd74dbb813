"""The public functions (floor 5)."""

from .kvcache import sparse_attn_with_kvcache

__all__ = ["sparse_attn_with_kvcache"]
