"""The public functions: argument checks, the layout cache, dispatch to the kernels or the
pure-PyTorch path."""

from .attention import sparse_attn_func
from .cache import cached_layout, clear_layout_cache
from .kvcache import sparse_attn_with_kvcache
from .varlen import build_varlen_layout, sparse_attn_varlen_func

__all__ = ["build_varlen_layout", "cached_layout", "clear_layout_cache", "sparse_attn_func",
           "sparse_attn_varlen_func", "sparse_attn_with_kvcache"]
