"""blocksparse_fsa: exact attention over fixed sparse patterns, with Triton kernels that walk
only the tiles a pattern touches."""

from . import patterns, reference
from .api import sparse_attn_with_kvcache
from .attention import clear_layout_cache, sparse_attn_func
from .layout import SparseLayout, build_layout

__version__ = "0.1.0"

__all__ = ["SparseLayout", "build_layout", "clear_layout_cache", "patterns", "reference",
           "sparse_attn_func", "sparse_attn_with_kvcache"]
