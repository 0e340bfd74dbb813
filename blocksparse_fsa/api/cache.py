"""The layout cache of per-call patterns: a model that passes the same ``attn_indices`` (or
``attn_mask``) to every layer builds its layout once.

A hit is decided by content, never by identity or version counters alone: each entry keeps a
copy of its pattern, and a lookup compares the pattern with that copy on its device (one read
of the pattern and one host sync). Writes that bypass the version counter (``t.data[...]``,
``t.numpy()[...]``, ``t.data = u``, another tensor sharing the storage) therefore never give a
stale layout, and inference tensors (which have no version counter) work too. Reuse without
the comparison is explicit: build the layout once and pass ``layout=``.
"""

from __future__ import annotations

import collections
import weakref

import torch

LAYOUT_CACHE_SIZE = 8
# an entry: its pattern's (shape, dtype, device) and the caller's args, then a weak reference
# to the tensor it was built from (a hint for the first comparison), the copy, the layout
_ENTRIES: collections.OrderedDict = collections.OrderedDict()
_next_id = iter(range(1 << 62))


def cached_layout(pattern: torch.Tensor, args: tuple, build):
    """``build()``'s result for this ``pattern`` and ``args``, built once per distinct content.

    ``pattern``: the tensor the layout is a function of (indices or a bool mask); ``args``: the
    other inputs of ``build``, compared with ``==`` (a :class:`SparseLayout` by identity, and
    held by the cache). A hit costs one comparison of ``pattern`` with the cached copy; a miss
    builds, keeps a copy of ``pattern`` (its size in memory) and evicts the least recently used
    of :data:`LAYOUT_CACHE_SIZE` entries. The layout is built outside inference mode, so a
    layout first built under ``torch.inference_mode()`` also serves training.
    """
    if not isinstance(pattern, torch.Tensor):
        raise TypeError(f"pattern must be a torch.Tensor, got {type(pattern).__name__}")
    original, pattern = pattern, pattern.detach()
    key = (tuple(pattern.shape), pattern.dtype, pattern.device, args)
    candidates = [(entry_id, entry) for entry_id, entry in reversed(_ENTRIES.items())
                  if entry[0] == key]
    candidates.sort(key=lambda item: item[1][1]() is not original)  # the same tensor first
    for entry_id, (_, _, copy, layout) in candidates:
        if torch.equal(copy, pattern):
            _ENTRIES.move_to_end(entry_id)
            return layout
    with torch.inference_mode(False):
        layout = build()
        copy = pattern.clone()
    _ENTRIES[next(_next_id)] = (key, weakref.ref(original), copy, layout)
    while len(_ENTRIES) > LAYOUT_CACHE_SIZE:
        _ENTRIES.popitem(last=False)
    return layout


def clear_layout_cache() -> None:
    """Forget the layouts built from per-call ``attn_indices`` / ``attn_mask`` (and the
    transformers integration's intersections of a model's mask with ``sparse_layout``), and the
    copies of their patterns."""
    _ENTRIES.clear()
