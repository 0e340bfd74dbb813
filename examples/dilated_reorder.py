"""The benchmark's dilated window (each query sees 512 keys at stride 4, causal) at L=2048:
as given, and with the tokens grouped by position mod 4, which turns it into four plain
sliding windows. Both run forward + backward and are checked; outputs come back in the
original order either way."""

import torch

import blocksparse_fsa as bsa
from _check import draw, run_and_check

length, size, stride = 2048, 512, 4
i = torch.arange(length)[:, None]
idx = i - stride * torch.arange(size)[None, :]
idx = torch.where(idx >= 0, idx, -1)[None, None]
plain = bsa.build_layout(idx, length, is_causal=True)
packed = bsa.build_layout(idx, length, is_causal=True, reorder=("dilation", stride))
print(f"dilated window, {size} keys at stride {stride}, causal, L={length}: as given")
run_and_check(plain)
print("the same, tokens grouped by position mod 4")
run_and_check(packed)
draw(dilated=plain, dilated_reordered=packed)
