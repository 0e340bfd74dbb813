"""A small Llama (transformers, random weights, fp32) trained one step with
``attn_implementation="blocksparse_fsa"`` on a sliding-window + global-token pattern, checked
against the same model run with ``attn_implementation="eager"`` and the pattern's dense mask:
logits, every parameter's gradient, and the logits after an optimizer step. Needs
``pip install -e ".[hf]"``; runs on a GPU if there is one, else on the CPU."""

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import blocksparse_fsa as bsa
import blocksparse_fsa.integrations.transformers  # noqa: F401  registers "blocksparse_fsa"

device = "cuda" if torch.cuda.is_available() else "cpu"
batch, length = 2, 111
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
# from_config writes the implementation into the config it gets: give each model its own
ours = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                        attn_implementation="blocksparse_fsa").to(device)
eager = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                         attn_implementation="eager").to(device)
eager.load_state_dict(ours.state_dict())

# once per batch, shared by every layer: causal window of 16 keys + 4 global tokens
layout = bsa.patterns.sliding_window(length, left=15, global_tokens=4, is_causal=True,
                                     device=device)
# the reference: eager attention adds a 4-D float mask to its scores (used as given), 0 where
# the layout attends and the most negative float elsewhere
allowed = layout.to_dense_mask()  # (1, 1, L, L) bool
dense_mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed,
                                                                   torch.finfo(torch.float32).min)

ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
runs = {}
for name, model, kwargs in [("ours", ours, dict(sparse_layout=layout)),
                            ("eager", eager, dict(attention_mask=dense_mask))]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    runs[name] = out.logits.detach(), grads, model(ids, **kwargs).logits.detach()

(logits, grads, after), (logits_ref, grads_ref, after_ref) = runs["ours"], runs["eager"]


def rel(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


for name, err in [("logits", rel(logits, logits_ref)),
                  (f"grads (worst of {len(grads)})", max(map(rel, grads, grads_ref))),
                  ("logits after a step", rel(after, after_ref))]:
    print(f"{name:>20}: relative error vs reference {err:.2e}")
    assert err < 1e-4, name
print(f"Llama {config.num_hidden_layers} layers, Hq={config.num_attention_heads}, "
      f"Hkv={config.num_key_value_heads}, B={batch}, L={length} on {device}: {layout}")
