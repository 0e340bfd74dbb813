"""blocksparse_fsa: exact attention over fixed sparse patterns, with Triton kernels that walk
only the tiles a pattern touches."""

from . import patterns, reference
from .api import (build_varlen_layout, cached_layout, clear_layout_cache, sparse_attn_func,
                  sparse_attn_varlen_func, sparse_attn_with_kvcache)
from .layout import SparseLayout, build_layout
from .ops import set_debug

__version__ = "0.1.0"

__all__ = ["SparseLayout", "build_layout", "build_varlen_layout", "cached_layout",
           "clear_layout_cache", "patterns", "reference", "set_debug", "sparse_attn_func",
           "sparse_attn_varlen_func", "sparse_attn_with_kvcache"]
