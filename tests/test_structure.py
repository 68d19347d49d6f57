"""The package's shape (issues 11 and 24): no import circle, no module over 500 lines, no function over 80,
no string test of the save method outside the output registry, only ``cli`` prints, and transformers/peft
are never imported by the package."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "streammerge"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Package modules imported by ``name`` anywhere in it (function-level imports included)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            for a in node.names:
                out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in mods and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append([*stack[stack.index(v) :], v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
    return found


def test_no_import_cycles():
    mods = _modules()
    graph = {n: _imports(n, p, mods) for n, p in mods.items()}
    assert "streammerge.api" in graph["streammerge"]  # the walker sees imports at all (function-level too)
    assert _cycles(graph) == []


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_rooms_stay_small():
    big = []
    for name, path in _modules().items():
        src = path.read_text()
        if len(src.splitlines()) > 500:
            big.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                big.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert big == []


def test_only_cli_prints_and_no_reference_libraries_at_run_time():
    bad = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "print" and ".cli" not in name:
                bad.append(f"{name}: print()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{name}: imports {n}" for n in names if n.split(".")[0] in ("transformers", "peft")]
    assert bad == []


def test_one_module_per_stored_format_and_per_output():
    from streammerge import formats
    from streammerge.outputs import OUTPUTS

    assert {f.__name__.rsplit(".", 1)[1] for f in formats.FORMATS} == {"bnb4", "bnb8", "fp8", "mxfp4"}
    for f in formats.FORMATS:
        assert callable(f.group) and callable(f.stray) and isinstance(f.LABEL, str)
    encoded = {name for name, o in OUTPUTS.items() if o.encoding_for is not None}
    assert encoded == {"merged_4bit", "merged_fp8", "mxfp4"}
    assert all(callable(OUTPUTS[n].edit_config) for n in encoded)


def test_no_string_test_of_the_save_method_outside_the_registry():
    """``save_method == "gguf"`` and the like: a new output would need edits wherever they are."""
    from streammerge.outputs import SAVE_METHODS

    bad = []
    for name, path in _modules().items():
        if name == "streammerge.outputs":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                consts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]
                names = [getattr(n, "attr", getattr(n, "id", "")) for n in operands]
                if any(c in SAVE_METHODS for c in consts) and any("save_method" in n or n == "kind" for n in names):
                    bad.append(f"{name}:{node.lineno}")
    assert bad == []


#: the package's layers, in the direction data flows (a module imports only from its own layer or above it)
LAYERS = [
    ["version", "errors", "outputs"],
    ["header", "source", "archive", "conversions", "keymap", "lora", "updates", "tuner_updates", "options"],
    ["formats", "adapters"],
    ["experts", "match"],
    ["plan", "report"],
    ["execute", "pipeline", "sinks"],
    ["job", "distributed", "hub"],
    ["api", "batch", "verify", "verify_kinds", "synthetic"],
    ["cli", "__main__"],
]


def _layer(module: str) -> int | None:
    found = [
        (len(p), i)
        for i, names in enumerate(LAYERS)
        for p in (f"streammerge.{n}" for n in names)
        if module == p or module.startswith(p + ".")
    ]
    return max(found)[1] if found else None


def test_no_import_from_a_lower_layer_up():
    mods = _modules()
    placed = {n: _layer(n) for n in mods if n != "streammerge"}
    assert [n for n, layer in placed.items() if layer is None] == []  # every module has a layer
    up = [
        f"{n} (layer {placed[n]}) imports {t} (layer {placed[t]})"
        for n, p in mods.items()
        if n != "streammerge"
        for t in _imports(n, p, mods)
        if t != "streammerge" and placed[t] > placed[n]
    ]
    assert up == []
