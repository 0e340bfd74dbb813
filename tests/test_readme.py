"""The README's quickstart runs as pasted (on the CPU here: the pure-PyTorch path)."""

import os
import re
import subprocess
import sys

from .helpers import REPO


def test_readme_quickstart_runs_as_pasted(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'device="cuda"' not in code
    script = tmp_path / "quickstart.py"
    script.write_text(code + "\nassert out.shape == q.shape and lse.shape == (1, 8, 1024)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ci_runs_the_readme_test_command_verbatim():
    """CI (.ci/run) runs the README's fresh-machine test command as printed, and the `test`
    extra that command installs holds every pytest plugin its options need."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(c for c in commands if "venv" in c and "pytest" in c)
    assert test_command in (REPO / ".ci" / "run").read_text()
    extra = re.search(r"^test = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    if re.search(r"pytest .*-n ", test_command):
        assert '"pytest-xdist' in extra
