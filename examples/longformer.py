"""Longformer-style attention: a causal sliding window, a few global tokens and attention
sinks, built straight into a layout, plotted, run forward + backward and checked."""

import blocksparse_fsa as bsa
from _check import draw, run_and_check

length = 1024
layout = bsa.patterns.sliding_window(length, left=127, global_tokens=[0, 1, 512], sinks=4,
                                     is_causal=True)
print(f"Longformer-style window 128 + global tokens 0, 1, 512 + 4 sinks, L={length}")
run_and_check(layout)
draw(longformer=layout)
