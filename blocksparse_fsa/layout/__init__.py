"""The tile layout: ``SparseLayout`` (``core``) and what builds, converts, draws and permutes it.

``core`` holds the data classes at the bottom of the stack; ``build`` (indices, dense masks,
predicates, the kernel choice), ``convert`` (SciPy, per-query indices, FlexAttention),
``gather_index`` (the per-query CSR of the gather kernels), ``reorder`` (token permutations)
and ``viz`` (pictures) are built on it and import it, never the other way round.
"""

from .build import (GATHER_MAX_DENSITY, build_layout, dense_layout, layout_from_dense_mask,
                    layout_from_predicate, reordered, with_kernel)
from .core import (DEFAULT_BLOCK_M, DEFAULT_BLOCK_N, GatherIndex, SparseLayout, popcount32,
                   tile_rows, unpack_bits)

__all__ = ["DEFAULT_BLOCK_M", "DEFAULT_BLOCK_N", "GATHER_MAX_DENSITY", "GatherIndex",
           "SparseLayout", "build_layout", "dense_layout", "layout_from_dense_mask",
           "layout_from_predicate", "popcount32", "reordered", "tile_rows", "unpack_bits",
           "with_kernel"]
