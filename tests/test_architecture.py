"""The layering the README's architecture section states, checked on the source: one service layer
(`launcher/api.py`) and three faces (CLI, MCP server, dashboard) that call it and not each other,
and no import circle among the launcher's modules (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

FACES = {"launcher.cli", "launcher.mcp_server", "launcher.dashboard"}


def modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, ast.AST]]:
    """(module imported, the import node) for every import in the file that names one of `known` (a
    package's submodule counts as that submodule)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    found.append((sub, node))
                elif base in known:
                    found.append((base, node))
    return [f for f in found if f[0] != name]


def graph() -> dict[str, set[str]]:
    mods = modules("launcher")
    return {m: {t for t, _ in imports(m, p, set(mods))} for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def face_of(module: str) -> str | None:
    return next((f for f in FACES if module == f or module.startswith(f + ".")), None)


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_launcher_modules():
    edges = graph()
    assert "launcher.api" in edges and len(edges) > 30
    assert cycles(edges) == []


def test_the_service_layer_imports_no_face():
    edges = graph()
    assert not {face_of(m) for m in edges["launcher.api"]} - {None}, edges["launcher.api"]
    assert "launcher.console" not in edges["launcher.api"]  # rendering belongs to the faces


def test_faces_call_the_service_layer_not_each_other():
    mods = modules("launcher")
    for name, path in mods.items():
        face = face_of(name)
        if face is None:
            continue
        for target, node in imports(name, path, set(mods)):
            other = face_of(target)
            if other is None or other == face:
                continue
            # the CLI starts the other faces (`meetara mcp`, `meetara dashboard`): their serve() only
            assert face == "launcher.cli", f"{name} imports {target}"
            fn = next(
                f
                for f in ast.walk(ast.parse(path.read_text()))
                if isinstance(f, ast.FunctionDef) and f.lineno <= node.lineno <= f.end_lineno
            )
            assert fn.name in ("mcp_command", "dashboard_command"), (fn.name, target)
    # the MCP server and the dashboard reach the launcher through the service layer only
    for name, path in mods.items():
        if face_of(name) in ("launcher.mcp_server", "launcher.dashboard"):
            used = {t for t, _ in imports(name, path, set(mods))}
            assert used <= {"launcher.api"} | {m for m in mods if face_of(m) == face_of(name)}, (name, used)
