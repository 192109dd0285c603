"""The library's shape (DESIGN.md, "Target layout"): small files, no import cycles, math without
torch.distributed, and ``import soap_dist`` needing torch alone."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "soap_dist"
MAX_LINES = 500
PURE = ("kernels", "linalg", "qr", "layout", "stores", "owner_layout", "zero_layout", "plan", "plan.costs")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """soap_dist modules imported at module level or inside functions (``from x import submodule`` counts
    the submodule, not its package)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            deps |= set(subs) if len(subs) == len(node.names) else {target, *subs}
    return {d for d in deps if d in modules and d != name}


def test_no_file_over_500_lines():
    """The library, the launchers and the tests alike."""
    long = {
        str(p.relative_to(ROOT.parent)): n
        for folder in ("soap_dist", "launchers", "tests")
        for p in (ROOT.parent / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules: {long}"


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_math_and_layout_modules_know_nothing_of_torch_distributed():
    """Not imported by them, nor by any soap_dist module they import (comm is where it lives)."""
    modules = _modules()
    for short in PURE:
        seen, todo = set(), [f"soap_dist.{short}"]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in ast.walk(ast.parse(modules[name].read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                assert not any(n.startswith("torch.distributed") for n in names), (short, name)
            todo += _imports(name, modules[name], modules) - {"soap_dist"}
        assert "soap_dist.comm" not in seen, short


def test_the_cycle_check_can_fail(tmp_path):
    """The checker sees a cycle when there is one (a test must be able to fail)."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from soap_dist.b import x\n")
    b.write_text("from soap_dist.a import y\n")
    modules = {"soap_dist.a": a, "soap_dist.b": b}
    assert _imports("soap_dist.a", a, modules) == {"soap_dist.b"}
    assert _imports("soap_dist.b", b, modules) == {"soap_dist.a"}
