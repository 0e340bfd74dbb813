"""Shared test set-up: the CPU interpreter tier and NaN-poisoned outputs (the shared helpers,
the tolerance rule among them, are in ``tests/helpers.py``)."""

import os

import torch

# Without a GPU, the Triton kernels run on CPU tensors under the interpreter. This must be set
# before triton compiles (decorates) any kernel, i.e. before blocksparse_fsa is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from blocksparse_fsa.kernels import poison_outputs as poisoned_kernel_outputs  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output buffer starts as NaN: an unwritten tile fails the comparison."""
    with poisoned_kernel_outputs():
        yield
