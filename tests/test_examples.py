"""The examples run end to end (each checks itself against the reference) and draw their
pictures. They run the pure-PyTorch path on the CPU, so the interpreter is switched off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name,pictures,needs", [
    ("quickstart", [], []),
    ("longformer", ["longformer"], ["matplotlib"]),
    ("document_packing", ["document_packing"], ["matplotlib"]),
    ("dilated_reorder", ["dilated", "dilated_reordered"], ["matplotlib"]),
    ("neighborhood_2d", ["neighborhood_2d", "neighborhood_2d_patched"], ["matplotlib"]),
    ("hf_llama", [], ["transformers"]),
    ("hf_generate", [], ["transformers"]),
])
def test_example_runs_and_checks_itself(name, pictures, needs, tmp_path):
    for module in needs:
        pytest.importorskip(module)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, str(EXAMPLES / f"{name}.py")] + ([str(tmp_path)] if pictures else [])
    done = subprocess.run(args, cwd=EXAMPLES, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "relative error vs reference" in done.stdout
    for picture in pictures:
        assert (tmp_path / f"{picture}.png").stat().st_size > 10_000
