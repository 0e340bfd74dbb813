"""Bad scalars, patterns of the wrong type or device, a backend that cannot run: each is a
clear error naming the argument and what to pass instead."""

import numpy as np
import pytest
import torch

import blocksparse_fsa as bsa


def call(**overrides):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g) for _ in range(3))
    args = dict(query=q, key=k, value=v, backend="torch")
    args.update(overrides)
    return bsa.sparse_attn_func(**args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite float"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a finite float"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite and > 0"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be finite and > 0"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be finite and > 0"),
    (dict(softmax_scale=-0.5), ValueError, "softmax_scale must be finite and > 0"),
    (dict(softmax_scale="0.5"), TypeError, "softmax_scale must be a float"),
    (dict(softmax_scale=True), TypeError, "softmax_scale must be a float"),
    (dict(softmax_scale=torch.tensor(0.5)), TypeError, "softmax_scale must be a float"),
    (dict(is_causal="no"), TypeError, "is_causal must be True, False or None"),
    (dict(is_causal=1), TypeError, "is_causal must be True, False or None"),
    (dict(return_lse="yes"), TypeError, "return_lse must be True or False"),
    (dict(backend=None), ValueError, "backend must be one of"),
    (dict(attn_indices=[[[[0, 1]] * 20] * 2]), TypeError,
     r"attn_indices must be an integer torch.Tensor, got list; convert it once with "
     r"torch.as_tensor"),
    (dict(attn_indices=np.zeros((1, 2, 20, 3), dtype=np.int64)), TypeError,
     "attn_indices must be an integer torch.Tensor, got ndarray"),
    (dict(attn_mask=np.ones((1, 1, 20, 20), dtype=bool)), TypeError,
     "attn_mask must be a bool torch.Tensor, got ndarray"),
    (dict(attn_indices=torch.zeros(1, 2, 20, 3, dtype=torch.long, device="meta")), ValueError,
     "attn_indices is on the meta device"),
    (dict(query=torch.randn(1, 20, 2, 16, device="meta")), ValueError,
     "query is on the meta device"),
])
def test_bad_arguments_name_themselves(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


def test_good_scalars_of_other_real_types():
    want = call(softmax_scale=0.25, softcap=2.0)
    torch.testing.assert_close(call(softmax_scale=np.float32(0.25), softcap=2), want)
    torch.testing.assert_close(call(is_causal=False), call(is_causal=None))


def test_triton_backend_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='torch' .* TRITON_INTERPRET=1"):
        call(backend="triton")
    call(backend="auto")  # the pure-PyTorch path, without an error
