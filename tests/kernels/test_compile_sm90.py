"""Every kernel variant the API launches compiles for a Hopper GPU (sm_90), checked on the CPU
with Triton's offline compiler: the interpreter tier cannot catch compile-only errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.compile
@pytest.mark.parametrize("options", [["--tma", "0"], ["--tma", "1", "--skip-layout-build",
                                                     "--warp-specialize"]],
                         ids=["plain-and-layout-build", "tma"])
def test_kernels_compile_for_sm90(options):
    """Two halves in two processes: with pytest-xdist they compile on two cores at once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_sm90.py")),
                          *options], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    assert "compiled" in res.stdout.splitlines()[-1]
