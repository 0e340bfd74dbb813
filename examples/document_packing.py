"""Packed sequences: five documents of different lengths in one row, each attending only to
itself, causally, within a 256-token window; plotted, run forward + backward and checked."""

import torch

import blocksparse_fsa as bsa
from _check import draw, run_and_check

cu_seqlens = torch.tensor([0, 100, 420, 460, 900, 1200])
layout = bsa.patterns.document(cu_seqlens, is_causal=True, window=256)
print(f"document packing, cu_seqlens={cu_seqlens.tolist()}, causal, window 256")
run_and_check(layout)
draw(document_packing=layout)
