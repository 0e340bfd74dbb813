"""Launching the layout build's kernels: the scalars of one problem shape bound once.

Every launch goes through Triton's public ``kernel[grid](...)``; a bound launch only saves
re-spelling some thirty keyword arguments per call. Outputs are allocated with
:func:`new_int`, which fills them with a poison value while the tests ask for it.
"""

import torch

from ...kernels import common


class BoundKernel:
    """``kernel[grid](**scalars, **tensors)`` with ``scalars`` (one problem shape's integer
    arguments, constexprs and launch options) fixed at construction."""

    def __init__(self, kernel, **scalars):
        self.kernel = kernel
        self.scalars = scalars

    def __call__(self, grid: tuple, **tensors):
        self.kernel[grid](**self.scalars, **tensors)


def new_int(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` for integer outputs, filled with a poison value while the tests poison
    kernel outputs, so that an entry a kernel forgot to write fails the comparison."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(-0x7A5A5A5A) if common.outputs_poisoned() else t
