"""The layers' import rules, read from the source: engine/, kernels/ and ingest/ never import the product,
and the product's modules never import each other in a circle (lazy imports inside functions count too:
they are how the old circle cli → sessions → tui → workers → cli hid)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOWER = {"engine": "salachat.engine", "kernels": "salachat.kernels", "ingest": "salachat.ingest"}


def _modules() -> dict[str, Path]:
    """Dotted name → file, for the product (salachat/) and the lower layers (installed under salachat.)."""
    found = {}
    for folder, prefix in [("salachat", "salachat"), *LOWER.items()]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The modules of ours that `name` imports anywhere in its file (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from salachat.cli import options` imports the submodule
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in MODULES else base)
    ours = set()
    for target in targets:
        while target and target not in MODULES:  # salachat.engine.loader.LoadedModel → salachat.engine.loader
            target = target.rpartition(".")[0]
        if target and target != "salachat" and target != name:
            ours.add(target)
    return ours


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LOWER else "product"


def test_the_module_map_sees_every_layer():
    layers = {_layer(name) for name in MODULES}
    assert layers == {"engine", "kernels", "ingest", "product"}
    assert "salachat.chat" in MODULES and "salachat.engine.loader" in MODULES


def test_engine_kernels_and_ingest_never_import_the_product():
    wrong = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() if _layer(name) != "product"
                   for target in targets if _layer(target) == "product")
    assert not wrong, "lower layers reach up into the product:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_product_modules_import_each_other_without_circles():
    product = {name: {t for t in targets if _layer(t) == "product"} for name, targets in GRAPH.items()
               if _layer(name) == "product"}
    circles = _cycles(product)
    assert not circles, "import circles in the product: " + "; ".join(" ↔ ".join(c) for c in circles)


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_face_imports_another_face():
    faces = {"salachat.cli": "cli", "salachat.tui": "tui", "salachat.server": "server"}

    def face(name: str) -> str | None:
        return next((f for prefix, f in faces.items() if name == prefix or name.startswith(prefix + ".")), None)

    wrong = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
                   if face(name) and face(target) and face(name) != face(target)
                   and not (face(name) == "cli" and target in ("salachat.tui", "salachat.server.command")))
    assert not wrong, "\n".join(wrong)
