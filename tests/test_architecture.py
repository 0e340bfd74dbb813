"""The package's shape, read from its source: a one-way stack of floors, no import circle, no
file over 600 lines, no module importing another's private names, numba loaded lazily."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "blocksparse_fsa"
# Floors, lowest first; a module may import its own floor and the floors below. The longest
# matching prefix decides (``layout.core`` sits on floor 1 under the rest of ``layout``).
FLOORS = {
    "blocksparse_fsa.preprocess": 1, "blocksparse_fsa.kernels": 1,
    "blocksparse_fsa.reference": 1, "blocksparse_fsa.layout.core": 1,
    "blocksparse_fsa.layout": 2,
    "blocksparse_fsa.patterns": 3,
    "blocksparse_fsa.ops": 4, "blocksparse_fsa.distributed": 4,
    "blocksparse_fsa.api": 5, "blocksparse_fsa.attention": 5,
    "blocksparse_fsa.integrations": 6,
    "blocksparse_fsa": 7,
}
MAX_UPWARD = 3  # the delegates on SparseLayout (build, convert, viz), imported when called


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]):
    """``(target, lazy, private_names)`` for every import of a package module in ``path``;
    ``lazy``: inside a function."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    lazy_nodes = {id(n) for f in ast.walk(tree)
                  if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
    type_checking = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(i.test) for n in ast.walk(i)}
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else \
                node.module
            if not target.startswith("blocksparse_fsa"):
                continue
            for alias in node.names:  # ``from . import config``: the submodule itself
                sub = f"{target}.{alias.name}"
                if sub in known:
                    yield sub, id(node) in lazy_nodes, []
                else:
                    private = [alias.name] if alias.name.startswith("_") else []
                    yield target, id(node) in lazy_nodes, private
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("blocksparse_fsa"):
                    yield alias.name, id(node) in lazy_nodes, []


def graph():
    mods = modules()
    edges = []
    for name, path in mods.items():
        for target, lazy, private in imports(name, path, set(mods)):
            if target != name:
                edges.append((name, target, lazy, private))
    return mods, edges


def test_no_file_over_600_lines():
    """The library and the installed benchmark harness beside it."""
    harness = ROOT.parent / "benchmarks" / "blocksparse_fsa_bench"
    files = [*ROOT.rglob("*.py"), *harness.rglob("*.py")]
    long = {str(p.relative_to(ROOT.parent)): n for p in files
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_imports_run_down_the_floors():
    _, edges = graph()
    upward = sorted({(a, b) for a, b, _, _ in edges if floor(b) > floor(a)})
    assert all(lazy for a, b, lazy, _ in edges if floor(b) > floor(a)), \
        "an upward import at module level"
    assert len(upward) <= MAX_UPWARD, upward


def test_no_import_circle_at_module_level():
    """Module-level imports, with the package ``__init__`` that importing a submodule runs,
    form no cycle: every module imports without tripping over a half-initialised one."""
    mods, edges = graph()
    succ = {m: set() for m in mods}
    for a, b, lazy, _ in edges:
        if not lazy:
            succ[a].add(b)
    for m in mods:  # importing a.b.c from outside a.b runs a.b first
        parent = m.rpartition(".")[0]
        if parent in mods and parent != "blocksparse_fsa":
            for importer in [a for a in mods if m in succ[a]]:
                if importer != parent and not importer.startswith(parent + "."):
                    succ[importer].add(parent)
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(succ[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):]
                                                                     + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m)


# Known, owned elsewhere: the transformers integration reads the layout cache through a private
# name until the cache has a public home (``api/cache.py``). Remove the entry with the import.
KNOWN_PRIVATE: set = set()


def test_no_private_names_across_modules():
    _, edges = graph()
    private = {(a, b, name) for a, b, _, names in edges for name in names}
    assert private <= KNOWN_PRIVATE, sorted(private - KNOWN_PRIVATE)


@pytest.mark.parametrize("module", ["blocksparse_fsa"])
def test_import_does_not_load_numba(module):
    code = f"import sys, {module}; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
