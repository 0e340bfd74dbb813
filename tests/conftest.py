"""Shared test set-up: the CPU interpreter tier and NaN-poisoned outputs (the shared helpers,
the tolerance rule among them, are in ``tests/helpers.py``)."""

import os

# Under pytest-xdist (`-n auto`) the workers share the cores: one worker's intra-op threads
# per core it owns, so that N workers never run N x cores threads. Set before torch, numpy and
# numba read them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _THREADS = str(max(1, (_CORES or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, _THREADS)

import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
