"""Pattern builders that return a :class:`~blocksparse_fsa.SparseLayout` directly.

No builder materialises per-query index tensors or anything of size Lq x Lk. Each one computes
analytically which (query tile, key tile) pairs may hold an active pair (O(QT * KT) bools per
head: 4M at L = 131072 with 64-token tiles) and which are certainly full, then evaluates the
exact pattern, a FlexAttention-style ``mask_mod``, on the remaining tiles in bounded chunks
(:mod:`blocksparse_fsa.preprocess.predicate`). The result is tensor for tensor the layout that
``SparseLayout.from_dense_mask`` builds from the same pattern's dense mask.

Conventions shared by every builder:

- Query ``i`` and key ``j`` are token indices; when ``Lq != Lk`` the query's *position* is
  ``p(i) = i + (Lk - Lq)`` (bottom-right alignment, as for ``is_causal``).
- ``is_causal=True`` ANDs ``j <= i + (Lk - Lq)`` into the pattern and is recorded on the layout
  (``sparse_attn_func`` checks it against its own ``is_causal``).
- ``block_m`` / ``block_n`` pick the layout's tile (default 64 x 64); ``device`` is where the
  work runs and where the layout is returned.

Builders: :func:`layout_from_predicate` (the generic engine, from ``layout.build``),
:func:`sliding_window`, :func:`dilated_window`, :func:`block_sparse`, :func:`bigbird`,
:func:`fixed`, :func:`document`, :func:`neighborhood_1d`, :func:`neighborhood_2d`,
:func:`neighborhood_3d`, :func:`union`, :func:`intersection`.
"""

from ..layout.build import layout_from_predicate
from .blocks import bigbird, block_sparse, fixed
from .combine import intersection, union
from .neighborhood import neighborhood_1d, neighborhood_2d, neighborhood_3d
from .window import dilated_window, document, sliding_window

__all__ = ["bigbird", "block_sparse", "dilated_window", "document", "fixed", "intersection",
           "layout_from_predicate", "neighborhood_1d", "neighborhood_2d", "neighborhood_3d",
           "sliding_window", "union"]
