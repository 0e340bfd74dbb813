"""blocksparse_fsa: exact attention over fixed sparse patterns, with Triton kernels that walk
only the tiles a pattern touches."""

from . import patterns, reference
from .api.kvcache import sparse_attn_with_kvcache
from .api.varlen import build_varlen_layout, sparse_attn_varlen_func
from .attention import clear_layout_cache, sparse_attn_func
from .layout import SparseLayout, build_layout

__version__ = "0.1.0"

__all__ = ["SparseLayout", "build_layout", "build_varlen_layout", "clear_layout_cache",
           "patterns", "reference", "sparse_attn_func", "sparse_attn_varlen_func",
           "sparse_attn_with_kvcache"]
