"""``benchmarks/gpu_choice.py`` (a GPU session's step): a mode replaces the default only when
it ran every row, beat the default by more than the margin, and the tests ran to a pass."""

import json

import gpu_choice as script  # benchmarks/ is on the path (conftest)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_choice(tmp_path, capsys):
    kernels = [dict(label=label, pattern=p, pass_name=s, ms=ms)
               for label, ms in (("before", 0.5), ("pointer", 1.0), ("branch", 0.95),
                                 ("select", 0.995))
               for p in ("window", "bigbird") for s in ("fwd", "fwdbwd")]
    kernels.append(dict(label="select", pattern="extra", pass_name="fwd", ms=0.0))
    _write(tmp_path / "ab_kernels.jsonl", kernels)
    _write(tmp_path / "ab_decode.jsonl",
           [dict(label=label, pattern="window", batch=8, mode=m, ms=ms)
            for label, ms in (("kernel", 1.0), ("ticket", 0.995)) for m in ("eager", "graph")])
    (tmp_path / "gpu_window_decode_tests.log").write_text("40 passed in 9.1s\n")
    script.main([str(tmp_path), "--write", str(tmp_path / "choice")])
    # "before" (another checkout) and rows one mode alone ran do not count; 0.5% is noise
    assert (tmp_path / "choice").read_text() == "PARTIAL_LOADS=branch\nDECODE_MERGE=kernel\n"
    # a failure, or a run a timeout cut before pytest's summary, keeps the defaults
    for log in ("1 failed, 39 passed in 9.1s\n", "bringing up nodes...\n........\n"):
        (tmp_path / "gpu_window_decode_tests.log").write_text(log)
        script.main([str(tmp_path)])
        assert capsys.readouterr().out.splitlines()[-2:] == ["PARTIAL_LOADS=pointer",
                                                             "DECODE_MERGE=kernel"]
