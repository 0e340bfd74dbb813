"""CPU smoke test of ``benchmarks/window_build_stamps.py`` (a GPU session's step): its steps
build the layout ``window_layout`` builds."""

import window_build_stamps as script  # benchmarks/ is on the path (conftest)

from ..helpers import needs_kernels


@needs_kernels
def test_smoke(capsys):
    device = "cuda" if script.torch.cuda.is_available() else "cpu"
    assert script.main(["--device", device, "--seq-len", "300", "--window", "63",
                        "--sinks", "2", "--runs", "2"])
    out = capsys.readouterr().out
    assert "the same as window_layout's" in out and "bit kernel (launch)" in out
