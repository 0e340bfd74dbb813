"""The transformers integration: whole fp32 models on a layout against the same weights run with
``attn_implementation="eager"`` and the equivalent dense mask (logits and every parameter's
gradient), and the errors."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig  # noqa: E402

import blocksparse_fsa as bsa  # noqa: E402
from blocksparse_fsa.integrations.transformers import ATTN_IMPLEMENTATION  # noqa: E402

from ..helpers import DEVICE  # noqa: E402

BATCH, LENGTH, VOCAB, HQ, HKV = 2, 101, 128, 4, 2
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=HQ, num_key_value_heads=HKV)


def twin_models(config):
    """Ours and an eager model with the same random weights (each gets its own config:
    ``from_config`` writes the implementation into the config it is given)."""
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                            attn_implementation=ATTN_IMPLEMENTATION)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    eager.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == ATTN_IMPLEMENTATION
    return ours.to(DEVICE), eager.to(DEVICE)


def additive(allowed):
    """Bool mask (True = attend) -> the float mask eager attention adds to its scores."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)


def logits_and_grads(model, ids, keep, **kwargs):
    """Logits at the ``keep`` positions and every parameter's gradient of a loss on them."""
    model.zero_grad()
    logits = model(ids, **kwargs).logits
    torch.nn.functional.cross_entropy(logits[keep], ids[keep]).backward()
    return logits[keep].detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_models_match(ours, eager, ids, keep, ours_kwargs, eager_kwargs):
    logits, grads = logits_and_grads(ours, ids, keep, **ours_kwargs)
    logits_ref, grads_ref = logits_and_grads(eager, ids, keep, **eager_kwargs)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def window_global_layout():
    """The example's pattern: causal window of 16 keys and 4 global tokens; batch and heads 1."""
    return bsa.patterns.sliding_window(LENGTH, left=15, global_tokens=4, is_causal=True,
                                       device=DEVICE)


def per_kv_head_layout():
    """Random causal keys per (batch, KV head), plus the diagonal (no empty rows: eager would
    average over every key where we return zeros), on 32 x 32 tiles."""
    g = torch.Generator().manual_seed(1)
    rand = torch.randint(0, LENGTH, (BATCH, HKV, LENGTH, 12), generator=g)
    diag = torch.arange(LENGTH).expand(BATCH, HKV, LENGTH)[..., None]
    idx = torch.cat([rand, diag], dim=-1).to(DEVICE)
    return bsa.build_layout(idx, LENGTH, is_causal=True, block_m=32, block_n=32)


@pytest.mark.parametrize("make_layout", [window_global_layout, per_kv_head_layout],
                         ids=["window16-global4", "random-per-kv-head"])
def test_llama_matches_eager(make_layout):
    ours, eager = twin_models(LlamaConfig(**SMALL))
    layout = make_layout()
    dense = layout.to_dense_mask()  # (B|1, H|1, L, L), causal
    mask = dense.repeat_interleave(HQ // dense.shape[1], dim=1)  # eager's heads are Hq
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), device=DEVICE)
    keep = torch.ones_like(ids, dtype=torch.bool)
    assert_models_match(ours, eager, ids, keep, dict(sparse_layout=layout),
                        dict(attention_mask=additive(mask)))


def left_padding(layout):
    """The second row starts with 7 padding tokens: they leave the layout as keys, and as
    queries they see no key, so only the real positions are compared."""
    real = torch.ones(BATCH, LENGTH, dtype=torch.bool, device=DEVICE)
    real[1, :7] = False
    allowed = layout.to_dense_mask() & real[:, None, None, :]
    return {}, {"attention_mask": real.long()}, allowed, real


def packed_documents(layout):
    """Two documents per row, told apart by position_ids restarting at 40 (transformers finds
    them when there is no cache)."""
    pos = torch.arange(LENGTH, device=DEVICE)
    doc = pos >= 40
    shared = {"position_ids": torch.where(doc, pos - 40, pos).expand(BATCH, -1),
              "use_cache": False}
    allowed = layout.to_dense_mask() & (doc[:, None] == doc[None, :])
    return shared, {}, allowed, torch.ones(BATCH, LENGTH, dtype=torch.bool, device=DEVICE)


@pytest.mark.parametrize("model_mask", [left_padding, packed_documents],
                         ids=["left-padding", "packed-documents"])
def test_llama_model_mask_is_intersected(model_mask):
    ours, eager = twin_models(LlamaConfig(**SMALL))
    layout = window_global_layout()
    shared, ours_only, allowed, keep = model_mask(layout)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), device=DEVICE)
    assert_models_match(ours, eager, ids, keep, {**shared, **ours_only, "sparse_layout": layout},
                        {**shared, "attention_mask": additive(allowed)})


def test_gemma2_softcap_scaling_and_sliding_layers():
    """Gemma-2: a logit softcap low enough to bite on a random model's small scores, a
    query_pre_attn_scalar scale, and a sliding-window layer whose window (8 keys) is narrower
    than the layout's (16): that layer gets their intersection."""
    window = 8
    config = Gemma2Config(**SMALL, head_dim=16, sliding_window=window,
                          attn_logit_softcapping=0.1, query_pre_attn_scalar=10,
                          layer_types=["sliding_attention", "full_attention"])
    ours, eager = twin_models(config)
    layout = window_global_layout()
    dense = layout.to_dense_mask()
    pos = torch.arange(LENGTH, device=DEVICE)
    in_window = (pos[:, None] - pos[None, :]) < window
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), device=DEVICE)
    keep = torch.ones_like(ids, dtype=torch.bool)
    masks = {"full_attention": additive(dense), "sliding_attention": additive(dense & in_window)}
    assert_models_match(ours, eager, ids, keep, dict(sparse_layout=layout),
                        dict(attention_mask=masks))


def dense_layout(length=LENGTH, is_causal=True):
    return bsa.SparseLayout.dense(length, length, is_causal=is_causal, device=DEVICE)


@pytest.mark.parametrize("config_args,forward_args,error,match", [
    ({}, lambda: dict(sparse_layout=dense_layout().to_dense_mask()), TypeError,
     "sparse_layout must be a SparseLayout"),
    (dict(attention_dropout=0.1), lambda: dict(sparse_layout=dense_layout()), ValueError,
     "has no attention dropout"),
    ({}, lambda: dict(sparse_layout=dense_layout(is_causal=False)), ValueError,
     "the model is causal but sparse_layout is not"),
    ({}, lambda: dict(sparse_layout=dense_layout(),
                      attention_mask=torch.zeros(BATCH, 1, LENGTH, LENGTH, device=DEVICE)),
     TypeError, "as torch.float32: pass a 2-D padding mask or a bool 4-D mask"),
    ({}, lambda: dict(sparse_layout=dense_layout(64)), ValueError, "layout is for q_len=64"),
    ({}, lambda: dict(sparse_layout=dense_layout().reordered(("dilation", 2)),
                      attention_mask=(torch.arange(LENGTH, device=DEVICE) >= 7).expand(BATCH, -1)),
     ValueError, "needs a layout without a token permutation"),
], ids=["not-a-layout", "dropout", "non-causal-layout", "float-mask",
        "wrong-length", "reordered-layout-and-padding"])
def test_errors(config_args, forward_args, error, match):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL, **config_args),
                                             attn_implementation=ATTN_IMPLEMENTATION).to(DEVICE)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), device=DEVICE)
    with pytest.raises(error, match=match):
        model.train()(ids, **forward_args())


def test_dropout_off_in_eval_mode():
    """transformers passes dropout=0 outside training: the dropout config is then fine."""
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL, attention_dropout=0.1),
                                             attn_implementation=ATTN_IMPLEMENTATION).to(DEVICE)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), device=DEVICE)
    assert model.eval()(ids, sparse_layout=dense_layout()).logits.isfinite().all()
