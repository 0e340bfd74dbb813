"""The public functions: argument checks, the layout cache, dispatch to the kernels or the
pure-PyTorch path."""

from .attention import sparse_attn_func
from .cache import cached_layout, clear_layout_cache

__all__ = ["cached_layout", "clear_layout_cache", "sparse_attn_func"]
