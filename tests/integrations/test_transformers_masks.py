"""The transformers integration without an Lq x Lk tensor: padding (a 2-D attention_mask),
packed sequences (position_ids) and sliding-window layers reach the kernels as layouts that
the model's own mask functions build tile by tile. An allocation spy records every tensor made
during forward and backward at L = 2048; outputs and gradients match eager attention."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig  # noqa: E402

import blocksparse_fsa as bsa  # noqa: E402
from blocksparse_fsa.integrations.transformers import (ATTN_IMPLEMENTATION,  # noqa: E402
                                                       ModelMask, layout_mask)

from ..helpers import DEVICE, needs_kernels  # noqa: E402

LENGTH, VOCAB = 2048, 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.0)


class AllocationSpy(TorchDispatchMode):
    """Records the largest storage (in elements) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op, self.calls = 0, None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                n = t.untyped_storage().nbytes() // max(1, t.element_size())
                if n > self.largest:
                    self.largest, self.op = n, func
        return out


def twin_models(config):
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                            attn_implementation=ATTN_IMPLEMENTATION)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    eager.load_state_dict(ours.state_dict())
    return ours.to(DEVICE), eager.to(DEVICE)


def run(model, ids, keep, kwargs):
    model.zero_grad()
    logits = model(ids, use_cache=False, **kwargs).logits
    loss = torch.nn.functional.cross_entropy(logits[keep], ids[keep])
    loss.backward()
    return logits[keep].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def padded():
    """Row 0 right-padded by 77 tokens, row 1 left-padded by 300."""
    real = torch.ones(2, LENGTH, dtype=torch.bool, device=DEVICE)
    real[0, -77:] = False
    real[1, :300] = False
    return dict(attention_mask=real.long()), real


def packed():
    """One row of four documents (one of a single token), told apart by position_ids."""
    lengths = [700, 1, 900, LENGTH - 1601]
    pos = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)[None]
    return dict(position_ids=pos), torch.ones(1, LENGTH, dtype=torch.bool, device=DEVICE)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("config", [LlamaConfig(**TINY), MistralConfig(**TINY, sliding_window=300)],
                         ids=["llama", "mistral-window300"])
@pytest.mark.parametrize("batch", [padded, packed], ids=["padded", "packed"])
def test_no_lq_by_lk_tensor_and_eager_match(config, batch):
    ours, eager = twin_models(config)
    kwargs, keep = batch()
    ids = torch.randint(0, VOCAB, keep.shape, device=DEVICE,
                        generator=torch.Generator(DEVICE).manual_seed(0))
    # the model's mask intersected with plain causal attention on 256 x 256 tiles, which keep
    # the interpreter fast (the model mask alone takes the default tiles, as tested below)
    causal = bsa.SparseLayout.dense(LENGTH, LENGTH, is_causal=True, block_m=256, block_n=256,
                                    device=DEVICE)
    spy = AllocationSpy()
    with spy:
        logits, grads = run(ours, ids, keep, dict(kwargs, sparse_layout=causal))
    assert spy.calls > 0
    assert spy.largest < LENGTH * LENGTH, (
        f"{spy.op} made a tensor of {spy.largest} elements >= Lq * Lk = {LENGTH * LENGTH}")
    eager_spy = AllocationSpy()  # the spy sees what eager attention makes: its (B,H,L,L) scores
    with eager_spy:
        logits_ref, grads_ref = run(eager, ids, keep, kwargs)
    assert eager_spy.largest >= LENGTH * LENGTH
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_layout_mask_skips_plain_causal_and_keeps_the_rest():
    from transformers.masking_utils import causal_mask_function
    args = dict(batch_size=2, q_length=10, kv_length=10, mask_function=causal_mask_function)
    assert layout_mask(**args) is None
    assert layout_mask(**args, attention_mask=torch.ones(2, 10, dtype=torch.bool)) is None
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[1, :3] = False
    mask = layout_mask(**args, attention_mask=pad)
    assert isinstance(mask, ModelMask) and mask.shape == (2, 1, 10, 10)
    dense = mask.layout(device="cpu").to_dense_mask()
    want = torch.ones(10, 10, dtype=torch.bool).tril() & pad[:, None, None, :]
    assert torch.equal(dense, want)
    assert mask.layout(device="cpu") is mask.layout(device="cpu")  # built once per forward
    assert isinstance(layout_mask(**args, local_size=4), ModelMask)  # a window must be built
    older = layout_mask(2, None, 12, mask_function=causal_mask_function, attention_mask=pad,
                        cache_position=torch.arange(2, 12))  # transformers < 4.56 arguments
    want = torch.ones(12, 12, dtype=torch.bool).tril()[2:] & torch.nn.functional.pad(
        pad, (0, 2), value=False)[:, None, None, :]
    assert torch.equal(older.layout(device="cpu").to_dense_mask(), want)


@pytest.mark.parametrize("blocks,q_len,offset", [((16, 16), 70, 0), ((32, 16), 45, 30)])
def test_causal_tile_maps_give_the_layout_of_evaluating_every_tile(blocks, q_len, offset):
    """transformers' plain causal mask skips the tiles it can classify; any other mask function
    (here the same one wrapped) evaluates them all: both layouts are the same."""
    from transformers.masking_utils import causal_mask_function
    pad = torch.ones(3, q_len + offset, dtype=torch.bool)
    pad[1, :37] = False
    pad[2, -5:] = False
    sparse = bsa.SparseLayout.dense(q_len, q_len + offset, is_causal=True, block_m=blocks[0],
                                    block_n=blocks[1])
    layouts = []
    for fn in (causal_mask_function, lambda *a: causal_mask_function(*a)):
        mask = layout_mask(3, q_len, q_len + offset, offset, 0, fn, pad)
        layouts.append(mask.layout(sparse))
    for name in ("full_ptr", "full_col", "part_ptr", "part_col", "masks", "part_ptr_t"):
        assert torch.equal(getattr(layouts[0], name), getattr(layouts[1], name)), name
    assert layouts[0].num_full_tiles > 0
