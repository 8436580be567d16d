"""The package's import graph, read under the installed names (``vllm_sparsity``,
``vllm_sparsity.tools``, ``vllm_sparsity.kernels`` from ``kernels/``, ``vllm_sparsity.eval`` from
``eval/``): every module imports, no import cycle (deferred imports inside functions included: a
deferred import hides a circle but does not remove it), and the runtime imports no offline tool."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Installed package -> its folder in the repository (pyproject.toml's package-dir).
PACKAGES = {"vllm_sparsity": ROOT / "vllm_sparsity",
            "vllm_sparsity.tools": ROOT / "vllm_sparsity" / "tools",
            "vllm_sparsity.kernels": ROOT / "kernels", "vllm_sparsity.eval": ROOT / "eval"}
TOOLS = "vllm_sparsity.tools"


def modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the four packages."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                    for a in node.names}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layers(edges: dict[str, set[str]]) -> list[list[str]]:
    """Modules by layer: layer 0 imports none of the others, layer n only layers below n.
    Raises AssertionError naming a cycle's modules when there is one."""
    done: dict[str, int] = {}
    left = dict(edges)
    while left:
        ready = {m for m, deps in left.items() if deps <= done.keys()}
        assert ready, f"import cycle among {sorted(left)}"
        for m in ready:
            done[m] = 1 + max((done[d] for d in left[m]), default=-1)
            del left[m]
    return [sorted(m for m, n in done.items() if n == level)
            for level in range(max(done.values()) + 1)]


def test_every_module_imports_under_its_installed_name():
    # In a fresh interpreter: importing the Triton kernels here would fix their mode (compiled or
    # TRITON_INTERPRET) for the kernel tests that run later in this process.
    names = sorted(modules())
    code = f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_import_cycle():
    layers(graph())


def test_the_runtime_imports_no_offline_tool():
    runtime = {m: deps for m, deps in graph().items()
               if not m.startswith(TOOLS) and not m.startswith("vllm_sparsity.eval")}
    offenders = {m: sorted(d for d in deps if d.startswith(TOOLS)) for m, deps in runtime.items()}
    assert {m: d for m, d in offenders.items() if d} == {}


@pytest.mark.parametrize("package", ["vllm_sparsity", "vllm_sparsity.tools",
                                     "vllm_sparsity.kernels", "vllm_sparsity.eval"])
def test_no_module_above_450_lines(package):
    long = {p.name: n for p in PACKAGES[package].glob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


if __name__ == "__main__":  # print the layers (README's "Import layers")
    for level, names in enumerate(layers(graph())):
        print(level, " ".join(names))
