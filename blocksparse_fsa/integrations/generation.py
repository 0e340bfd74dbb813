"""Serving a sparse pattern with HF ``generate()``: the pattern is given once, prefill runs on
a layout, every later step on the KV-cache kernel.

transformers refuses model keyword arguments it does not know in ``generate()``, so the
training path's ``sparse_layout=`` cannot reach the layers there; instead the pattern is
attached to the model's attention layers::

    from blocksparse_fsa.integrations.generation import SparsePattern, set_sparse_pattern

    model = AutoModelForCausalLM.from_config(config, attn_implementation="blocksparse_fsa")
    set_sparse_pattern(model, SparsePattern(left=1023, sinks=4))
    out = model.generate(input_ids, max_new_tokens=64)

Importing this module registers :func:`attention_forward` as ``"blocksparse_fsa"`` (the training
path's function with this dispatch in front). A layer with a pattern and no ``sparse_layout``
attends as follows: when its queries are all its keys (prefill, or a training step) through
``sparse_attn_func`` on the pattern's layout; when a cache holds earlier keys (decode, chunked
prefill) through ``sparse_attn_with_kvcache``, with the window and sinks evaluated in the
kernel, or the per-step indices. Left-padded batches (batched generation) count the pattern
from each row's first token and run on per-row key slots through the KV-cache kernel; any
other model mask is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from transformers import AttentionInterface

from ..api import sparse_attn_func, sparse_attn_with_kvcache
from .transformers import ATTN_IMPLEMENTATION, sparse_attention_forward


@dataclasses.dataclass(frozen=True)
class SparsePattern:
    """What each token of a causal model attends, at every length.

    Attributes:
        left: the sliding window: the token at position ``p`` sees keys ``p - left .. p``
            (``left=W-1`` for a window of ``W`` keys); None = no window (all earlier keys).
        sinks: the first ``sinks`` positions are seen by every later token. In a causal model
            these are also Longformer-style global tokens: a global token's own query sees
            only earlier keys, which are all sinks.
        indices: instead of a window, a callable ``indices(module, query, key)`` that returns
            the key positions each query attends, int ``(B|1, Hkv|1, Lq, W)`` in ``[0, Lk)``,
            -1 = unused (a top-k selector's output); ``query`` is ``(B, Hq, Lq, D)``, ``key``
            ``(B, Hkv, Lk, D)``, the queries being the last ``Lq`` positions. Positions after
            a query's own are dropped (causality).
    """

    left: int | None = None
    sinks: int = 0
    indices: Callable | None = None

    def __post_init__(self):
        if self.left is not None and (isinstance(self.left, bool) or not isinstance(
                self.left, int) or self.left < 0):
            raise ValueError(f"left must be an int >= 0 or None, got {self.left!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")
        if self.indices is not None:
            if not callable(self.indices):
                raise TypeError(f"indices must be callable, got {type(self.indices).__name__}")
            if self.left is not None or self.sinks:
                raise ValueError("give either indices or a window (left / sinks), not both")


def set_sparse_pattern(model: torch.nn.Module, pattern: SparsePattern | None):
    """Attach ``pattern`` to every attention layer of ``model`` (None detaches it) and return the
    model. The model must run ``attn_implementation="blocksparse_fsa"``; a ``sparse_layout=``
    passed to a forward still takes precedence."""
    if pattern is not None and not isinstance(pattern, SparsePattern):
        raise TypeError(f"pattern must be a SparsePattern or None, got {type(pattern).__name__}")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION:
        raise ValueError(f"the model runs attn_implementation={impl!r}: load it with "
                         f"attn_implementation={ATTN_IMPLEMENTATION!r} (or call "
                         f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})) first")
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]
    if not layers:
        raise ValueError("found no attention layers (modules with layer_idx and is_causal) in "
                         f"{type(model).__name__}")
    for layer in layers:
        layer.sparse_pattern = pattern
    return model


def pattern_of(module) -> SparsePattern | None:
    """The pattern ``set_sparse_pattern`` attached to an attention layer, if any."""
    return getattr(module, "sparse_pattern", None)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                      sparse_layout=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention function for ``"blocksparse_fsa"``: a layer's attached pattern
    when no ``sparse_layout`` is passed, else ``sparse_attention_forward``."""
    if sparse_layout is None and pattern_of(module) is not None:
        return pattern_attention_forward(module, query, key, value, attention_mask, scaling,
                                         dropout, softcap=softcap, is_causal=is_causal,
                                         position_ids=kwargs.get("position_ids"))
    return sparse_attention_forward(module, query, key, value, attention_mask, scaling, dropout,
                                    sparse_layout=sparse_layout, softcap=softcap,
                                    is_causal=is_causal, **kwargs)


def pattern_attention_forward(module, query, key, value, attention_mask, scaling=None,
                              dropout=0.0, softcap=None, is_causal=None, position_ids=None):
    """One layer's attention on its attached pattern (see the module docstring); transformers'
    attention-function contract: q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lk, D)`` holding the
    cache and the new keys. A model mask is served when it is causal attention over
    left-padded rows (batched generation), which ``position_ids`` must confirm: the pattern
    then counts positions from each row's first token. Returns ``(out (B, Lq, Hq, D), None)``."""
    pattern = pattern_of(module)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if not causal:
        raise ValueError("a SparsePattern serves causal models only; pass sparse_layout= for "
                         "bidirectional attention")
    if dropout:
        raise ValueError(f"a SparsePattern has no attention dropout, got dropout={dropout}: "
                         "call model.eval() or set the config's attention_dropout to 0")
    q_len, k_len = query.shape[2], key.shape[2]
    pads = None
    if attention_mask is not None:
        pads = left_padding(attention_mask, position_ids, query.shape[0], q_len, k_len)
        if pads is None:
            raise ValueError("a SparsePattern serves causal attention over left-padded rows "
                             "only, but the model passes another mask (right padding, a static "
                             "cache, packed sequences or the model's own sliding window): use "
                             "left padding with the default dynamic cache, or pass "
                             "sparse_layout=")
        if pattern.left is None and pattern.indices is None:  # plain causal: the model's mask
            return sparse_attention_forward(module, query, key, value, attention_mask,
                                            scaling, dropout, softcap=softcap,
                                            is_causal=is_causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    softcap = softcap or 0.0
    indices = None if pattern.indices is None else pattern.indices(module, query, key)
    if pads is not None:  # the pattern in each row's own positions, as key slots
        if torch.is_grad_enabled() and query.requires_grad:
            raise ValueError("a SparsePattern serves padded batches for generation only (no "
                             "gradients): pass sparse_layout= to train on padded batches")
        if indices is None:
            indices = _padded_window(pattern, pads, q_len, k_len)
        else:
            indices = torch.where(indices >= pads.view(-1, 1, 1, 1), indices, -1)
        return sparse_attn_with_kvcache(q, k, v, cache_seqlens=k_len, attn_indices=indices,
                                        is_causal=True, softmax_scale=scaling,
                                        softcap=softcap, check=pattern.indices is not None), None
    window = (-1, -1) if pattern.left is None else (pattern.left, 0)
    if q_len == k_len:  # no earlier keys: the layout path (differentiable); a window's layout
        # is analytic and cached by value, so every layer shares it
        if indices is not None:
            out = sparse_attn_func(q, k, v, attn_indices=indices, is_causal=True,
                                   softmax_scale=scaling, softcap=softcap)
        else:
            out = sparse_attn_func(q, k, v, window_size=window, sinks=pattern.sinks,
                                   is_causal=True, softmax_scale=scaling, softcap=softcap)
        return out, None
    if q_len > k_len:
        raise ValueError(f"the layer got {q_len} queries but only {k_len} keys")
    out = sparse_attn_with_kvcache(
        q, k, v, cache_seqlens=k_len, attn_indices=indices,
        window_size=window if indices is None else (-1, -1),
        sinks=pattern.sinks, is_causal=True, softmax_scale=scaling, softcap=softcap,
        check=indices is not None)  # a window needs no check: lengths come from shapes
    return out, None


def left_padding(attention_mask, position_ids, batch, q_len, k_len):
    """Per row, the pad slots before its first token (int64 ``(B,)``) when the model's mask is
    causal attention over left-padded rows and nothing else, else None. Reads the mask's last
    query row only (a ``ModelMask``'s predicate, or a bool tensor's row)."""
    if position_ids is None or position_ids.shape != (batch, q_len):
        return None
    slots = torch.arange(k_len, device=position_ids.device)
    pads = (k_len - 1) - position_ids[:, -1].long()
    if hasattr(attention_mask, "predicate"):
        rows = torch.arange(batch, device=slots.device)[:, None]
        last = attention_mask.predicate(rows, rows * 0, rows * 0 + q_len - 1, slots[None, :])
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool \
            and attention_mask.dim() == 4:
        last = attention_mask[:, 0, -1, :]
    else:
        return None
    expect = slots[None, :] >= pads[:, None]
    # every real query's position is its slot minus its row's pads
    q_slots = slots[k_len - q_len:]
    real = q_slots[None, :] >= pads[:, None]
    consistent = (position_ids == q_slots[None, :] - pads[:, None]) | ~real
    if last.shape != expect.shape or not (torch.equal(last.to(expect.device), expect)
                                          and bool(consistent.all())):
        return None
    return pads


def _padded_window(pattern, pads, q_len, k_len):
    """``(B, 1, Lq, W)`` key slots of a window + sinks counted from each row's first token."""
    dev = pads.device
    q_slots = torch.arange(k_len - q_len, k_len, device=dev)
    width = min(pattern.left, k_len - 1) + 1
    window = q_slots[:, None] - torch.arange(width, device=dev)  # (Lq, W)
    sinks = pads[:, None] + torch.arange(pattern.sinks, device=dev)  # (B, S)
    idx = torch.cat([window.expand(pads.shape[0], -1, -1),
                     sinks[:, None, :].expand(-1, q_len, -1)], dim=-1)
    keep = (idx >= pads.view(-1, 1, 1)) & (idx < k_len)
    return torch.where(keep, idx, -1)[:, None]


AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
