"""Greedy ``generate()`` of a small Llama (transformers, random weights, fp32) with a pattern
attached once: a causal window of 16 keys + 4 sinks. The prompt runs on a layout, every new
token on the KV-cache kernel (``sparse_attn_with_kvcache``); checked against recomputing the
whole sequence at every step without a cache, on the training path (``sparse_layout=``).
Needs ``pip install -e ".[hf]"``; runs on a GPU if there is one, else on the CPU."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import blocksparse_fsa as bsa
from blocksparse_fsa.integrations.generation import SparsePattern, set_sparse_pattern

device = "cuda" if torch.cuda.is_available() else "cpu"
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="blocksparse_fsa")
model = model.to(device).eval()
set_sparse_pattern(model, SparsePattern(left=15, sinks=4))  # once: every layer, every step

prompt = torch.randint(1, config.vocab_size, (2, 40), device=device)
out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                     output_scores=True, return_dict_in_generate=True)

# the reference: no cache, the whole sequence through the training path at every step
seq, worst = prompt, 0.0
with torch.no_grad():
    for step, scores in enumerate(out.scores):
        layout = bsa.patterns.sliding_window(seq.shape[1], left=15, sinks=4, is_causal=True,
                                             device=device)
        logits = model(seq, sparse_layout=layout).logits[:, -1]
        worst = max(worst, ((scores - logits).norm() / logits.norm()).item())
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
print(f"logits of {len(out.scores)} steps: relative error vs reference {worst:.2e}")
assert worst < 1e-4 and torch.equal(out.sequences, seq), "generate() differs from recomputing"
print(f"generated {out.sequences.shape[1] - prompt.shape[1]} tokens for {prompt.shape[0]} "
      f"prompts on {device}, token for token as the cache-free recomputation")
