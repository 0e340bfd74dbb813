"""CPU smoke test of ``benchmarks/window_build_stamps.py`` (a GPU session's step): its steps
build the layout ``window_layout`` builds."""

import importlib.util
from pathlib import Path

from ..helpers import needs_kernels

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "window_build_stamps.py"


@needs_kernels
def test_smoke(capsys):
    spec = importlib.util.spec_from_file_location("window_build_stamps", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    device = "cuda" if script.torch.cuda.is_available() else "cpu"
    assert script.main(["--device", device, "--seq-len", "300", "--window", "63",
                        "--sinks", "2", "--runs", "2"])
    out = capsys.readouterr().out
    assert "the same as window_layout's" in out and "bit kernel (launch)" in out
