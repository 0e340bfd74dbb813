"""HF transformers: ``attn_implementation="blocksparse_fsa"`` runs a model's attention on a layout.

Importing this module registers :func:`sparse_attention_forward` with transformers'
``AttentionInterface`` under :data:`ATTN_IMPLEMENTATION`, and transformers' own boolean SDPA
mask builder (``masking_utils.sdpa_mask``) with its ``AttentionMaskInterface``::

    import blocksparse_fsa.integrations.transformers  # registers "blocksparse_fsa"

    model = AutoModelForCausalLM.from_config(config, attn_implementation="blocksparse_fsa")
    layout = blocksparse_fsa.patterns.sliding_window(L, left=255, global_tokens=4, is_causal=True)
    loss = model(input_ids, labels=input_ids, sparse_layout=layout).loss  # every layer

The model hands its extra keyword arguments to every attention layer, so one layout per batch
serves them all. A layer attends to the pairs that are both in the layout and in the model's
own mask, so padding, sliding-window layers and packed sequences keep their meaning. When the
model's mask is plain causal attention without padding (the usual training batch) transformers
passes none, the layout is used as it is and nothing of size Lq x Lk is built. Otherwise the
mask is a dense bool ``(B, 1, Lq, Lk)`` tensor, as for ``"sdpa"``; its intersection with the
layout is built once per mask tensor (the same one reaches every layer of a kind) and kept in
``sparse_attn_func``'s layout cache.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from ..api import cached_layout, sparse_attn_func
from ..layout import SparseLayout
from ..patterns import intersection

ATTN_IMPLEMENTATION = "blocksparse_fsa"


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, *, sparse_layout=None, softcap=None, is_causal=None,
                             **kwargs):
    """transformers' attention-function contract, computed by ``sparse_attn_func``.

    Args:
        module: the attention layer; its ``is_causal`` (default True) says whether the model
            is causal, unless ``is_causal`` is given. A causal model needs a causal layout.
        query: ``(B, Hq, Lq, D)``; key, value: ``(B, Hkv, Lk, D)``. KV heads are not repeated
            for GQA: the kernels share each one among its query heads.
        attention_mask: None, or the model's bool mask (True = attend), intersected with the
            layout: transformers builds ``(B, 1, Lq, Lk)``; a 4-D mask passed to the model
            may have any shape ``SparseLayout.from_dense_mask`` takes. A float (additive)
            mask is a ``TypeError``.
        scaling: the softmax scale (``1/sqrt(D)`` when None).
        dropout: must be 0: there is no attention dropout.
        sparse_layout: this batch's :class:`~blocksparse_fsa.SparseLayout` (required), for
            ``Lq`` queries and ``Lk`` keys, on the query's device, not token-permuted when the
            model passes a mask.
        softcap: Gemma-2's ``attn_logit_softcapping``, passed on as ``softcap`` (None = off).
        is_causal: overrides ``module.is_causal``.
        **kwargs: the model's other keyword arguments, unused (a layer's ``sliding_window``
            arrives as part of ``attention_mask``).

    Returns ``(out, None)`` with ``out`` ``(B, Lq, Hq, D)``: no attention weights are formed.
    """
    if sparse_layout is None:
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} needs the pattern: pass "
                         "sparse_layout=<SparseLayout> to the model's forward (build it once per "
                         "batch with blocksparse_fsa.build_layout or blocksparse_fsa.patterns)")
    if not isinstance(sparse_layout, SparseLayout):
        raise TypeError(f"sparse_layout must be a SparseLayout, got {type(sparse_layout).__name__}")
    if dropout:
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} has no attention dropout, "
                         f"got dropout={dropout}: set the config's attention_dropout to 0 or call "
                         "model.eval()")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if causal and not sparse_layout.is_causal:
        raise ValueError("the model is causal but sparse_layout is not: build it with "
                         "is_causal=True (build_layout and every pattern builder take it)")
    layout = sparse_layout if attention_mask is None else _with_model_mask(sparse_layout,
                                                                           attention_mask)
    out = sparse_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           softmax_scale=scaling, layout=layout, softcap=softcap or 0.0)
    return out, None


def _with_model_mask(layout: SparseLayout, mask: torch.Tensor) -> SparseLayout:
    """``layout`` intersected with the model's bool mask, built once per (mask, layout)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"attention_mask reached the attention function as {mask.dtype}: pass "
                        "a 2-D padding mask or a bool 4-D mask (True = attend)")
    if layout.is_reordered:
        raise ValueError("the model passes a mask (padding, a sliding window or packed "
                         "sequences) to intersect with sparse_layout, which needs a layout "
                         "without a token permutation")
    return cached_layout(mask, (layout,), lambda: intersection(layout, SparseLayout.from_dense_mask(
        mask, block_m=layout.block_m, block_n=layout.block_n, q_len=layout.q_len,
        k_len=layout.k_len)))


AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
