"""HF transformers: ``attn_implementation="blocksparse_fsa"`` runs a model's attention on a layout.

Importing this module registers :func:`sparse_attention_forward` with transformers'
``AttentionInterface`` under :data:`ATTN_IMPLEMENTATION`, and :func:`layout_mask` with its
``AttentionMaskInterface``::

    import blocksparse_fsa.integrations.transformers  # registers "blocksparse_fsa"

    model = AutoModelForCausalLM.from_config(config, attn_implementation="blocksparse_fsa")
    layout = blocksparse_fsa.patterns.sliding_window(L, left=255, global_tokens=4, is_causal=True)
    loss = model(input_ids, labels=input_ids, sparse_layout=layout).loss  # every layer

The model hands its extra keyword arguments to every attention layer, so one layout per batch
serves them all; without ``sparse_layout`` a layer attends exactly as the model's own mask says
(like ``"sdpa"`` or ``"flash_attention_2"``). The model's mask (causal, padding from a 2-D
``attention_mask``, packed sequences found from ``position_ids``, sliding windows) is never
materialised: :func:`layout_mask` returns a :class:`ModelMask` holding transformers' own mask
function, which the first layer evaluates tile by tile into a layout (as transformers' flex
path builds a BlockMask: every pair is evaluated once, in bounded chunks) and every later layer
of the forward reuses. A layer attends to the pairs that are both in ``sparse_layout`` and in
the model's mask. For plain causal attention without padding transformers passes no mask at
all and nothing is built. A 4-D bool mask passed to the model by hand is intersected with the
layout as it is, built once per mask tensor in ``sparse_attn_func``'s layout cache.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import causal_mask_function

from ..api import cached_layout, sparse_attn_func
from ..layout import DEFAULT_BLOCK_M, DEFAULT_BLOCK_N, SparseLayout
from ..patterns import intersection, layout_from_predicate

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
        attention_mask: None (plain causal or bidirectional attention, as the module says), a
            :class:`ModelMask` (what :func:`layout_mask` returns for padding, packing and
            windows), or a bool 4-D mask passed to the model by hand (True = attend, any shape
            ``SparseLayout.from_dense_mask`` takes); intersected with ``sparse_layout``. A
            float (additive) mask is a ``TypeError``.
        scaling: the softmax scale (``1/sqrt(D)`` when None).
        dropout: must be 0: there is no attention dropout.
        sparse_layout: this batch's :class:`~blocksparse_fsa.SparseLayout` for ``Lq`` queries
            and ``Lk`` keys, on the query's device, not token-permuted when the model passes a
            mask; None = the model's mask alone.
        softcap: Gemma-2's ``attn_logit_softcapping``, passed on as ``softcap`` (None = off).
        is_causal: overrides ``module.is_causal``.
        **kwargs: the model's other keyword arguments, unused (a layer's ``sliding_window``
            arrives as part of ``attention_mask``).

    Returns ``(out, None)`` with ``out`` ``(B, Lq, Hq, D)``: no attention weights are formed.
    """
    if sparse_layout is not None and not isinstance(sparse_layout, SparseLayout):
        raise TypeError(f"sparse_layout must be a SparseLayout, got {type(sparse_layout).__name__}")
    if dropout:
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} has no attention dropout, "
                         f"got dropout={dropout}: set the config's attention_dropout to 0 or call "
                         "model.eval()")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if causal and sparse_layout is not None and not sparse_layout.is_causal:
        raise ValueError("the model is causal but sparse_layout is not: build it with "
                         "is_causal=True (build_layout and every pattern builder take it)")
    if isinstance(attention_mask, ModelMask):
        layout = attention_mask.layout(sparse_layout, query.device)
    elif attention_mask is None:
        layout = sparse_layout
    else:
        layout = _with_model_mask(sparse_layout, attention_mask, query.shape[2], key.shape[2])
    out = sparse_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           softmax_scale=scaling, layout=layout, softcap=softcap or 0.0,
                           is_causal=bool(causal) if layout is None else None)
    return out, None


class ModelMask:
    """A model's attention mask as transformers defines it, unevaluated: ``mask_function(b, h,
    q_idx, kv_idx)`` (with the query and key offsets of a cache) AND the 2-D padding mask.

    ``shape`` is the ``(B, 1, Lq, Lk)`` of the mask it stands for; :meth:`layout` evaluates it
    tile by tile, once per tile size and device (every layer of a forward shares the object).
    """

    def __init__(self, batch, q_len, k_len, q_offset, kv_offset, mask_function, padding):
        self.shape = (batch, 1, q_len, k_len)
        self._offsets = (q_offset, kv_offset)
        self._mask_function = mask_function
        self._padding = padding
        self._layouts = {}

    def predicate(self, b, h, q_idx, kv_idx):
        q_off, kv_off = self._offsets
        kv_idx = kv_idx + kv_off
        hit = self._mask_function(b, h, q_idx + q_off, kv_idx)
        if self._padding is not None:
            hit = hit & self._padding[b, kv_idx]
        return hit

    def _causal_tiles(self, blocks, device):
        """``(may, full)`` ``[B, 1, QT, KT]`` tile maps when the mask is transformers' plain
        causal mask (with padding), so that only diagonal and padding-edge tiles are evaluated;
        ``(None, None)`` (every tile evaluated) for any other mask function."""
        if self._mask_function is not causal_mask_function:
            return None, None
        batch, _, q_len, k_len = self.shape
        bm = DEFAULT_BLOCK_M if blocks[0] is None else blocks[0]
        bn = DEFAULT_BLOCK_N if blocks[1] is None else blocks[1]
        q_off, kv_off = self._offsets
        r0 = torch.arange(0, q_len, bm, device=device) + q_off
        r1 = torch.clamp(r0 + bm, max=q_len + q_off) - 1
        c0 = torch.arange(0, k_len, bn, device=device) + kv_off
        c1 = torch.clamp(c0 + bn, max=k_len + kv_off) - 1
        may = (c0[None, :] <= r1[:, None]).expand(batch, 1, -1, -1)
        full = (c1[None, :] <= r0[:, None]).expand(batch, 1, -1, -1)
        if self._padding is not None:  # [B, KT]: key tiles with any / only real keys
            real = self._padding[:, kv_off:kv_off + k_len].to(device)
            real = torch.nn.functional.pad(real, (0, -(-k_len // bn) * bn - k_len), value=True)
            real = real.view(batch, -1, bn)
            may = may & real.any(-1)[:, None, None, :]
            full = full & real.all(-1)[:, None, None, :]
        return may, full

    def layout(self, sparse_layout=None, device=None) -> SparseLayout:
        """This mask's layout (on ``device``), intersected with ``sparse_layout`` if given (on
        its tiles, which must not be token-permuted)."""
        if sparse_layout is not None and sparse_layout.is_reordered:
            raise ValueError("the model passes a mask (padding, a sliding window or packed "
                             "sequences) to intersect with sparse_layout, which needs a layout "
                             "without a token permutation")
        blocks = (None, None) if sparse_layout is None else (sparse_layout.block_m,
                                                             sparse_layout.block_n)
        device = torch.device(device if sparse_layout is None else sparse_layout.device)
        key = (blocks, str(device), None if sparse_layout is None else id(sparse_layout))
        hit = self._layouts.get(key)
        if hit is not None and hit[0] is sparse_layout:
            return hit[1]
        own = self._layouts.get((blocks, str(device), None))
        if own is None:
            batch, _, q_len, k_len = self.shape
            may, full = self._causal_tiles(blocks, device)
            own = layout_from_predicate(q_len, k_len, self.predicate, may, batch=batch,
                                        block_m=blocks[0], block_n=blocks[1], device=device,
                                        full_tiles=full,
                                        chunk_pairs=min(_CHUNK_PAIRS, max(2**16,
                                                                          q_len * k_len // 16)))
            self._layouts[(blocks, str(device), None)] = (None, own)
        else:
            own = own[1]
        result = own if sparse_layout is None else intersection(sparse_layout, own)
        self._layouts[key] = (sparse_layout, result)  # holds the layout: its id stays its own
        return result


# pairs per mask-function call: few calls at long lengths, temporaries far below Lq x Lk
_CHUNK_PAIRS = 2**24


def layout_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                mask_function=None, attention_mask=None, *, cache_position=None,
                allow_is_causal_skip=True, local_size=None, **kwargs):
    """transformers' ``AttentionMaskInterface`` contract: the model's mask as a
    :class:`ModelMask` (or None where plain causal attention says it all, as for ``"sdpa"``).

    Takes the arguments transformers passes to ``sdpa_mask`` (``cache_position`` instead of
    ``q_length`` / ``q_offset`` in transformers < 4.56)."""
    if q_length is None:  # older transformers: the queries are cache_position
        q_length = cache_position.shape[0]
        q_offset = int(cache_position[0]) if q_length else 0
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    padding = None
    if attention_mask is not None:
        padding = attention_mask.bool()
        if padding.shape[-1] < kv_length + kv_offset:  # a static cache's unwritten slots
            padding = torch.nn.functional.pad(padding, (0, kv_length + kv_offset -
                                                        padding.shape[-1]), value=False)
        if bool(padding[:, kv_offset:kv_offset + kv_length].all()):
            padding = None
    unbounded = local_size is None or kv_length < local_size
    if padding is None and unbounded and (
            allow_is_causal_skip and q_length in (1, kv_length)
            or kwargs.get("allow_is_bidirectional_skip", False)):
        return None  # the attention function's dense causal / bidirectional path says it all
    if mask_function is None:
        mask_function = causal_mask_function
    return ModelMask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                     padding)


def _with_model_mask(layout, mask: torch.Tensor, q_len: int, k_len: int) -> SparseLayout:
    """``layout`` (or None) intersected with a bool mask the model was given, built once per
    (mask, layout)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"attention_mask reached the attention function as "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}: pass a 2-D padding "
                        "mask or a bool 4-D mask (True = attend)")
    if layout is None:
        return cached_layout(mask, (q_len, k_len), lambda: SparseLayout.from_dense_mask(
            mask, q_len=q_len, k_len=k_len))
    if layout.is_reordered:
        raise ValueError("the model passes a mask (padding, a sliding window or packed "
                         "sequences) to intersect with sparse_layout, which needs a layout "
                         "without a token permutation")
    return cached_layout(mask, (layout,), lambda: intersection(layout, SparseLayout.from_dense_mask(
        mask, block_m=layout.block_m, block_n=layout.block_n, q_len=layout.q_len,
        k_len=layout.k_len)))


AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, layout_mask)
