"""Longformer-style attention: a causal sliding window, a few global tokens and attention
sinks, built straight into a layout, plotted, run forward + backward and checked."""

import sys

import blocksparse_fsa as bsa
from _check import run_and_check

length = 1024
layout = bsa.patterns.sliding_window(length, left=127, global_tokens=[0, 1, 512], sinks=4,
                                     is_causal=True)
print(f"Longformer-style window 128 + global tokens 0, 1, 512 + 4 sinks, L={length}")
run_and_check(layout)
if len(sys.argv) > 1:  # a folder for the picture
    path = f"{sys.argv[1]}/longformer.png"
    layout.plot(path)
    print(f"  tile map written to {path}")
