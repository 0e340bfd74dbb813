"""Shared test set-up: the CPU interpreter tier, NaN-poisoned outputs, the tolerance rule."""

import os

import torch

# Without a GPU, the Triton kernels run on CPU tensors under the interpreter. This must be set
# before triton compiles (decorates) any kernel, i.e. before blocksparse_fsa is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from blocksparse_fsa.kernels import common  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the kernel tiers: CUDA tensors on a GPU, CPU tensors under the interpreter
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(not (INTERPRET or HAS_CUDA),
                                   reason="needs TRITON_INTERPRET=1 or a GPU")
# the atol of the tolerance rule (assert_rule) per dtype
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output buffer starts as NaN: an unwritten tile fails the comparison."""
    common.POISON_OUTPUTS = True
    yield
    common.POISON_OUTPUTS = False


def assert_rule(name, ours, lowp, ref, atol):
    """FlashAttention's rule: |ours - ref| <= 2 * |lowp - ref| + atol (max over elements), where
    ``lowp`` is the same math in PyTorch at the inputs' precision and ``ref`` a higher-precision
    reference. On failure, say where the worst element is and how far off it is."""
    ours, lowp, ref = ours.double(), lowp.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), finite), (
        f"{name}: non-finite values differ: ours has {(~torch.isfinite(ours)).sum()} "
        f"(NaN {ours.isnan().sum()}), reference {(~finite).sum()}; first mismatch at "
        f"{(torch.isfinite(ours) != finite).nonzero()[0].tolist()}")
    assert torch.equal(ours[~finite], ref[~finite]), f"{name}: infinities differ"
    err = (ours - ref).abs().where(finite, 0.0)
    base = (lowp - ref).abs().where(finite, 0.0).max().item()
    bound = 2 * base + atol
    worst = err.max().item()
    if worst > bound:
        where = tuple(torch.nonzero(err == err.max())[0].tolist())
        raise AssertionError(
            f"{name}: max error {worst:.3e} > bound {bound:.3e} (2 * {base:.3e} + {atol:g}) at "
            f"index {where}: ours {ours[where].item():.6g}, reference {ref[where].item():.6g}; "
            f"{(err > bound).sum().item()} of {err.numel()} elements over the bound")
