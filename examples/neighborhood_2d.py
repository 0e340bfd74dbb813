"""2D neighbourhood attention (NATTEN-style) over a 64x64 image flattened row-major: each
token sees its 15x15 neighbourhood. In row-major order a 64-token query tile is one image row,
whose neighbourhoods spread over 15 rows of keys; reordering the tokens into 8x8 patches (one
patch = one 64-token tile) halves the tiles visited (960 -> 484, density 0.23 -> 0.47). Both
layouts are plotted, run forward + backward and checked; the reordered one returns outputs and
gradients in row-major order like the other."""

import torch

import blocksparse_fsa as bsa
from _check import draw, run_and_check

height, width, patch = 64, 64, 8
layout = bsa.patterns.neighborhood_2d(height, width, kernel_size=15)
print(f"2D neighbourhood 15x15 on a {height}x{width} image, row-major tokens")
run_and_check(layout)

# tile-major order: token (y, x) goes to patch (y // 8, x // 8), then row-major inside it
y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
patch_id = (y // patch) * (width // patch) + x // patch
key = patch_id * patch * patch + (y % patch) * patch + x % patch
order = torch.argsort(key.flatten())
patched = layout.reordered((order, order))
print("the same, tokens reordered into 8x8 patches (outputs stay in row-major order)")
run_and_check(patched)
draw(neighborhood_2d=layout, neighborhood_2d_patched=patched)
