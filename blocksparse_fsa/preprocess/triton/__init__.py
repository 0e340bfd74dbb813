"""Per-query key indices -> tile metadata in Triton, on the indices' GPU.

The same layout as the numba path (``preprocess.numba``) and the PyTorch path
(``preprocess.torch``), tensor for tensor, from five kernels and no sort, with one host sync
(``layout_tensors_triton`` says where). A *row* is one (layout batch, layout head, query tile) with
``block_m`` queries of ``width`` index slots each; persistent programs take rows in turn. A program
reads its row's indices in ``[block_m, CHUNK]`` chunks and ORs their bits into a bitmap of
``[block_m, SPAN]`` 32-bit key words starting at a tile-aligned word ``base`` (a *span*), kept in
the program's own scratch in global memory (L2). Triton has no register scatter, so a chunk goes in
by *steps*: each step takes every query's smallest word ``m`` not merged yet, ORs the bits of its
words ``m`` and ``m + 1`` (reductions over the chunk) and adds them to the scratch with one relaxed
atomic OR each. A query's 32 consecutive keys (a sliding window, in either order) take one step.

* ``indices_to_tiles_count_kernel``: centres the first span on the words of the row's first and
  last chunk, scans, and opens further spans below or above the covered words for indices outside;
  per row it writes the numbers of full and partial tiles and where pass 2 starts, and adds the
  active pairs, the tiles and the out-of-range indices to global counters. A row that one span held
  keeps its tiles, sorted, in a pool (slots from an atomic counter, up to a budget). Where
  ``CHUNK`` divides the width it first tries the *fast scan*: one step per chunk, assuming every
  query's active words there are two consecutive ones in the span, with vectorized loads through a
  ``cp.async`` pipeline and the atomics issued in the reduction's layout (``_or_into`` in
  ``scan``); a row that breaks the assumption is cleared and scanned the general way. Before that,
  the *window scan* (``scan.window_scan``) checks whether every query's slots hold one ascending
  run of keys (a sliding window written as ``i - W + 1 + arange(W)``, -1 outside ``[0, k_len)``) at
  a few operations per index, and builds such a row's bitmap in registers.
* ``indices_to_tiles_write_kernel``: writes the CSR pointers (each program sums the counts of the
  rows before its own), copies pooled rows to their CSR offsets and rescans the others in ascending
  spans from their first word, writing each tile's key (``preprocess.torch.transpose_keys``: its
  key tile and query tile) and counting the tiles of each key tile.
* The key-tile lists: ``column_pointers_kernel`` turns those counts into the lists' pointers,
  ``place_tiles_kernel`` puts each tile in its list at a slot from an atomic counter, and
  ``rank_tiles_kernel`` orders each list by query tile (each entry's rank: how many entries of its
  list are smaller; the query tiles of a list are distinct, so the result is the same every time).

Memory: O(rows + key tiles) counters, the programs' scratch (programs x block_m x SPAN words), the
pool (at most ``POOL_BYTES``) and O(tiles) for the lists: nothing of size Lq x Lk or (query tiles x
key tiles).

Modules: ``scan`` (the device code both passes share), ``count`` (pass 1), ``write`` (pass 2),
``transpose`` (the key-tile lists), ``build`` (the host side), ``config`` (warps, spans, chunks:
``get_tiles_config``) and ``launch`` (bound launches through ``kernel[grid]``).
"""

from .build import (CAPACITY_ENTRIES, LAST_BUILD, POOL_BYTES, forget_capacities,
                    indices_to_tiles_triton, layout_tensors_triton)

__all__ = ["CAPACITY_ENTRIES", "LAST_BUILD", "POOL_BYTES", "forget_capacities",
           "indices_to_tiles_triton", "layout_tensors_triton"]
