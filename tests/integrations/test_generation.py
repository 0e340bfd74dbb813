"""HF generate() with a pattern given once: greedy decoding of a tiny Llama matches eager
attention under the same dense mask token for token (scores too), prefill runs on a layout and
decode on the KV-cache kernel, and what cannot be served raises the integration's own error."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (AttentionInterface, AttentionMaskInterface,  # noqa: E402
                          AutoModelForCausalLM, LlamaConfig)
from transformers.masking_utils import sdpa_mask  # noqa: E402
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402

import blocksparse_fsa as bsa  # noqa: E402
from blocksparse_fsa.integrations import generation  # noqa: E402
from blocksparse_fsa.integrations.generation import SparsePattern, set_sparse_pattern  # noqa

from ..helpers import DEVICE  # noqa: E402

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
REFERENCE = "test_dense_pattern"


def dense_mask(pattern, module, query, key, pads=None):
    """Bool (B|1, Hkv|1, Lq, Lk): the pattern as the oracle reads it; with ``pads`` (B,) in
    each row's own positions (slot - pads), pad slots excluded."""
    q_len, k_len = query.shape[2], key.shape[2]
    p = k_len - q_len + torch.arange(q_len, device=query.device)[:, None]
    j = torch.arange(k_len, device=query.device)[None, :]
    if pads is not None:
        pad = pads.view(-1, 1, 1)
        p_tok, j_tok = p - pad, j - pad
        win = j_tok >= p_tok - pattern.left if pattern.left is not None else True
        return ((j_tok >= 0) & (j <= p) & (win | (j_tok < pattern.sinks)))[:, None]
    if pattern.indices is None:
        win = j >= p - pattern.left if pattern.left is not None else True
        return ((j <= p) & (win | (j < pattern.sinks)))[None, None]
    idx = pattern.indices(module, query, key).long()
    mask = torch.zeros(*idx.shape[:3], k_len + 1, dtype=torch.bool, device=query.device)
    mask.scatter_(3, idx.where(idx >= 0, k_len), True)
    return mask[..., :k_len] & (j <= p)


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kwargs):
    """transformers' eager attention with the additive form of the pattern's dense mask (in
    each row's own positions when transformers' mask shows left padding)."""
    pads = None if attention_mask is None else (~attention_mask[:, 0, -1, :]).sum(-1)
    mask = dense_mask(module.sparse_pattern, module, query, key, pads)
    mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
    additive = torch.zeros(mask.shape, device=query.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min)
    return eager_attention_forward(module, query, key, value, additive, scaling=scaling,
                                   dropout=0.0)


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def dilated_indices(module, query, key):
    """Per step: keys p, p-1, p-2, p-4, ... and 0 (with a duplicate and a -1), as a callable
    that sees only shapes, so both models select the same keys."""
    q_len, k_len = query.shape[2], key.shape[2]
    p = k_len - q_len + torch.arange(q_len, device=query.device)[:, None]
    offsets = torch.tensor([0, 1, 2, 4, 8, 16, 1], device=query.device)
    idx = torch.cat([p - offsets, torch.zeros_like(p), torch.full_like(p, -1)], dim=1)
    return idx.clamp(min=-1)[None, None].expand(query.shape[0], key.shape[1], -1, -1)


def twins(pattern):
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG),
                                            attn_implementation="blocksparse_fsa")
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation=REFERENCE)
    ref.load_state_dict(ours.state_dict())
    set_sparse_pattern(ours, pattern)
    for m in ref.modules():
        if hasattr(m, "layer_idx"):
            m.sparse_pattern = pattern
    return ours.to(DEVICE).eval(), ref.to(DEVICE).eval()


def greedy(model, ids, new_tokens=8):
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("pattern", [
    SparsePattern(left=6, sinks=2),
    SparsePattern(left=40),
    SparsePattern(),
    SparsePattern(indices=dilated_indices),
], ids=["window6-sinks2", "window-longer-than-cache", "causal", "indices"])
def test_generate_matches_eager(pattern, monkeypatch):
    ours, ref = twins(pattern)
    calls = {"layout": 0, "cache": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(generation, "sparse_attn_func",
                        spy("layout", generation.sparse_attn_func))
    monkeypatch.setattr(generation, "sparse_attn_with_kvcache",
                        spy("cache", generation.sparse_attn_with_kvcache))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    seq, scores = greedy(ours, ids.to(DEVICE))
    seq_ref, scores_ref = greedy(ref, ids.to(DEVICE))
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(scores, scores_ref, atol=1e-4, rtol=1e-4)
    layers = CONFIG.num_hidden_layers
    assert calls == {"layout": layers, "cache": layers * 7}  # prefill once, 7 decode steps


@pytest.mark.parametrize("pattern", [SparsePattern(left=5, sinks=2), SparsePattern()],
                         ids=["window5-sinks2", "causal"])
def test_generate_left_padded_batch(pattern):
    """Batched generation with left padding: the pattern counts each row's own positions."""
    ours, ref = twins(pattern)
    ids = torch.randint(1, CONFIG.vocab_size, (3, 19), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 4, 11)):
        ids[row, :pad] = 0
        attention_mask[row, :pad] = 0
    outs = []
    for model in (ours, ref):
        out = model.generate(ids.to(DEVICE), attention_mask=attention_mask.to(DEVICE),
                             max_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        outs.append((out.sequences, torch.stack(out.scores)))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-4)


def test_training_path_keeps_sparse_layout():
    """An explicit sparse_layout= wins over the attached pattern; without it the pattern's
    layout runs (and is differentiable)."""
    ours, _ = twins(SparsePattern(left=5, sinks=1))
    ids = torch.randint(0, CONFIG.vocab_size, (1, 33)).to(DEVICE)
    layout = bsa.patterns.sliding_window(33, left=5, sinks=1, is_causal=True, device=DEVICE)
    a = ours(ids, sparse_layout=layout).logits
    b = ours(ids).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    other = bsa.patterns.sliding_window(33, left=2, is_causal=True, device=DEVICE)
    assert not torch.allclose(ours(ids, sparse_layout=other).logits, b)
    ours.train()
    ours(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_errors():
    ours, _ = twins(SparsePattern(left=4))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9)).to(DEVICE)
    padding = torch.ones_like(ids)
    padding[0, -3:] = 0  # right padding: not causal attention over left-padded rows
    with pytest.raises(ValueError, match="left-padded rows only"):
        ours(ids, attention_mask=padding)
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    positions = (padding.cumsum(-1) - 1).masked_fill(padding == 0, 1)  # as generate() does
    with pytest.raises(ValueError, match="for generation only"):
        ours.train()(ids, attention_mask=padding, position_ids=positions, labels=ids)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='blocksparse_fsa'"):
        set_sparse_pattern(eager, SparsePattern(left=4))
    with pytest.raises(TypeError, match="SparsePattern"):
        set_sparse_pattern(ours, {"left": 4})
    with pytest.raises(ValueError, match="not both"):
        SparsePattern(left=3, indices=dilated_indices)
    with pytest.raises(ValueError, match="left"):
        SparsePattern(left=-1)
    with pytest.raises(TypeError, match="callable"):
        SparsePattern(indices=3)


def test_detach():
    """Without a pattern the layer attends as the model's own mask says (plain causal here)."""
    ours, _ = twins(SparsePattern())
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9)).to(DEVICE)
    causal = ours(ids).logits
    set_sparse_pattern(ours, SparsePattern(left=1))
    assert not torch.allclose(ours(ids).logits, causal)
    set_sparse_pattern(ours, None)
    torch.testing.assert_close(ours(ids).logits, causal)
