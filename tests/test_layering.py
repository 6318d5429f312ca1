"""The import layering of ARCHITECTURE.md, read from the source: every import of omnilm/ (at module
level and inside functions) is an edge; models/ imports nothing above itself, and there is no
import circle anywhere in the package."""

import ast
from pathlib import Path

import omnilm

ROOT = Path(omnilm.__file__).parent
# what models/ may import from the package: itself and the leaf modules below everything
MODELS_MAY_IMPORT = ("omnilm.models", "omnilm.config", "omnilm.errors", "omnilm.hooks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The omnilm modules `name` imports anywhere in its source (a `from pkg import sub` counts as
    importing pkg.sub when that is a module, else pkg)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "omnilm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "omnilm":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out |= subs or {target}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_models_import_nothing_above_themselves():
    bad = [
        f"{name} imports {dep}"
        for name, deps in graph().items()
        if name.startswith("omnilm.models")
        for dep in deps
        if not dep.startswith(MODELS_MAY_IMPORT)
    ]
    assert not bad, "models/ reaches up:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    g = graph()  # the package root is a node too: only the CLI, above it, may import it
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_function_level_imports():
    # a test that cannot fail is a defect: the walker must find a known function-level import
    assert "omnilm.convert.formats" in graph()["omnilm.api"]
