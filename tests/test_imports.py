"""Every moebench module imports on its own, and the modules' top-level imports of each other form
no cycle. A cycle works or fails depending on which of its modules is imported first (Python hands
out a half-initialized module), and used to hide behind imports moved into functions."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moebench"


def module_paths() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__.py).
    __main__ is left out: importing it runs the CLI."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def runtime_imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: at module level, inside `if`,
    `try` and `with` blocks too, but not inside functions or classes, and not under
    `if TYPE_CHECKING:`."""
    found = []

    def visit(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the moebench modules its runtime imports name. `from moebench.x import y` points
    at moebench.x, and at moebench.x.y too when y is a module. The parent packages Python imports
    on the way are not edges: a package that imports its own submodules (moebench.cli) is the
    usual layout, not a cycle."""
    modules = module_paths()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in runtime_imports(path):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{name}: relative import"
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}                  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert {"moebench.cli.ablation", "moebench.cli.bench", "moebench.cli.models"} <= graph["moebench.cli"]
    assert "moebench.presets" in graph["moebench.ablations"]
    assert "moebench.env" in graph["moebench.train"]               # `from moebench import env`


def test_module_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Each module is imported first, in a child forked from an interpreter that has loaded every
# third-party and standard module the package pulls in, and no moebench module. A fresh interpreter
# per module would take a minute of CPU: torch alone takes ~1.5 s to import, and torch.library's
# triton_op another ~1.5 s (dynamo, inductor, sympy).
DRIVER = r"""
import importlib, os, sys, traceback
modules = sys.argv[1].split(",")

def ours(name):
    return name == "moebench" or name.startswith("moebench.")

# a throwaway child imports the whole package and lists what else got loaded, in order
before = set(sys.modules)
read_end, write_end = os.pipe()
if os.fork() == 0:
    for name in modules:
        importlib.import_module(name)
    with os.fdopen(write_end, "w") as f:
        f.write("\n".join(m for m in sys.modules if m not in before and not ours(m)))
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end) as f:
    others = f.read().split()
os.wait()
for name in others:
    try:
        importlib.import_module(name)
    except BaseException:                  # some internals refuse to be imported by name: loaded anyway
        pass
assert not [m for m in sys.modules if ours(m)]
failed = []
for name in modules:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED:" + ",".join(failed))
"""


def test_every_module_imports_first():
    modules = module_paths()
    r = subprocess.run([sys.executable, "-c", DRIVER, ",".join(modules)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "FAILED:" in r.stdout, r.stderr[-3000:]
    failed = r.stdout.split("FAILED:")[1].strip()
    assert not failed, f"these modules fail when imported first: {failed}\n{r.stderr[-3000:]}"


# --- a bad name or option is refused before torch loads ------------------------------------------
# torch takes seconds to import (10-35 s on a cold disk): the CLI checks names and options first
LIGHT_MODULES = ("moebench", "moebench.registry", "moebench.presets", "moebench.specs", "moebench.config",
                 "moebench.fmt", "moebench.cli")

REFUSE_DRIVER = r"""
import sys
sys.argv = ["moebench", *sys.argv[1:]]
from moebench.cli import main
try:
    main()
except SystemExit as e:
    print(f"exit={e.code} torch={'torch' in sys.modules}")
"""


def test_the_cli_and_the_registry_import_without_torch():
    code = f"import sys, importlib; [importlib.import_module(m) for m in {LIGHT_MODULES!r}]; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("argv, message", [
    (["train", "NoSuchVariant"], "unknown variant 'NoSuchVariant'"),
    (["train", "Mamba_25M@tiny", "--tokens", "lots"], "bad token count 'lots'"),
    (["train", "Mamba_25M@tiny", "--ckpt-every", "2x"], "bad --ckpt-every '2x'"),
    (["sweep", "lr", "Mamba_25M", "--ckpt-every", "0"], "--ckpt-every must be positive"),
    (["run", "architectures", "--preset", "cpu-tin"], "no preset 'cpu-tin'; did you mean cpu-tiny?"),
    (["run", "no-such-ablation"], "unknown ablation 'no-such-ablation'"),
    (["run", "experts", "--only", "Mamba_25"], "'Mamba_25' is not a variant of ablation 'experts'"),
    (["sweep", "lr", "Mamba_25M", "--preset", "gpu-smal"], "unknown preset 'gpu-smal'; did you mean gpu-small?"),
    (["sweep", "lr", "NoSuchVariant"], "unknown variant 'NoSuchVariant'"),
    (["list", "--format", "yaml"], "unknown format 'yaml'"),
    (["bench", "train", "NoSuchVariant"], "unknown variant 'NoSuchVariant'"),
], ids=lambda x: "-".join(x) if isinstance(x, list) else None)
def test_a_bad_argument_is_refused_before_torch_loads(argv, message, tmp_path):
    r = subprocess.run([sys.executable, "-c", REFUSE_DRIVER, *argv, *(["--out", str(tmp_path)] if argv[0] in
                       ("train", "run") else [])], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert r.stdout.strip().splitlines()[-1:] == ["exit=2 torch=False"], (r.stdout, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert not any(tmp_path.iterdir()), "a refused command wrote nothing"
