"""Compile every variant of the decode kernels for sm_90 on the CPU (see ``compile_sm90.py``):
window / indices, causal or not, paged or not, one split or several, softcap, D 64/128/256,
arguments equal to 1 (which a launch turns into constants), and both ways of merging the
splits (``config.DECODE_MERGE``)."""

import sys

import torch
from triton.runtime.jit import JITFunction

from blocksparse_fsa.kernels import config
from blocksparse_fsa.kernels.decode import decode_fwd

from compile_sm90 import _seen, compile_offline  # noqa: E402 (run as a script from its folder)


# (dtype, D, paged, mode, causal, splits, (Lq, group, new keys)): every constexpr flag both
# ways, and Lq / group / new keys / Hkv equal to 1
VARIANTS = [
    (torch.bfloat16, 128, False, "window", True, 3, (1, 4, 1)),
    (torch.bfloat16, 128, True, "window", True, 1, (1, 4, 1)),
    (torch.float16, 64, False, "window", False, 3, (37, 1, 0)),
    (torch.bfloat16, 256, True, "window", True, 3, (5, 8, 5)),
    (torch.bfloat16, 128, True, "indices", True, 3, (1, 4, 1)),
    (torch.float16, 128, False, "indices", False, 1, (37, 1, 0)),
    (torch.bfloat16, 256, False, "indices", True, 3, (5, 8, 5)),
    (torch.float32, 64, True, "indices", True, 3, (1, 8, 1)),
]


def main():
    JITFunction.run = compile_offline
    tickets = [v[:5] + (4,) + v[6:] for v in VARIANTS if v[5] > 1]  # the merge in the kernel
    for i, (dtype, dim, paged, mode, causal, splits, (q_len, group, new)) in enumerate(
            VARIANTS + tickets):
        config.DECODE_MERGE = "kernel" if i < len(VARIANTS) else "ticket"
        batch, hkv, l_max = 2, 1 if group == 8 else 2, 256
        q = torch.randn(batch, q_len, hkv * group, dim, dtype=dtype)
        if paged:
            cache = torch.randn(9, 32, hkv, dim, dtype=dtype)
            table = torch.zeros(batch, 8, dtype=torch.int32)
        else:
            cache, table = torch.randn(batch, l_max, hkv, dim, dtype=dtype), None
        kw = dict(window_size=(31, 0 if causal else 7), sinks=1) if mode == "window" else dict(
            attn_indices=torch.zeros(batch, hkv, q_len, 40, dtype=torch.int32))
        print(f"-- {dtype} D={dim} paged={paged} {mode} causal={causal} splits={splits} "
              f"Lq={q_len} group={group} merge={config.DECODE_MERGE}", flush=True)
        decode_fwd(q, cache, cache, torch.zeros(batch, dtype=torch.int32), block_table=table,
                   num_new=new, is_causal=causal, softmax_scale=0.1,
                   softcap=3.0 if dim == 64 else 0.0, num_splits=splits, **kw)
    print(f"compiled {len(_seen)} decode kernel variants for sm_90")


if __name__ == "__main__":
    sys.exit(main())
