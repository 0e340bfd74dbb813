"""Packed sequences: five documents of different lengths in one row, each attending only to
itself, causally, within a 256-token window; plotted, run forward + backward and checked."""

import sys

import torch

import blocksparse_fsa as bsa
from _check import run_and_check

cu_seqlens = torch.tensor([0, 100, 420, 460, 900, 1200])
layout = bsa.patterns.document(cu_seqlens, is_causal=True, window=256)
print(f"document packing, cu_seqlens={cu_seqlens.tolist()}, causal, window 256")
run_and_check(layout)
if len(sys.argv) > 1:  # a folder for the picture
    path = f"{sys.argv[1]}/document_packing.png"
    layout.plot(path)
    print(f"  tile map written to {path}")
