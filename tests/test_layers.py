"""The package keeps its layers: every import between softprompt's sub-packages goes down the layer order, and
module-level imports form no cycle. Read from the source (ast), so lazy imports inside functions count too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "softprompt"

# What each layer may import (besides itself and the leaf module softprompt.options).
ALLOWED = {
    "core": set(),
    "data": set(),
    "formats": {"core", "data"},
    "training": {"core", "data", "formats", "inference"},  # self-study writes its conversations with the engine
    "inference": {"core", "data", "formats"},
    "evaluation": {"core", "data", "formats", "training", "inference"},
    "serve": {"core", "data", "formats", "inference"},
    "vllm": {"core", "data", "formats"},
    "demo": {"core", "data", "formats", "training", "inference", "evaluation"},
    "api": {"core", "data", "formats", "training", "inference", "evaluation", "serve", "vllm", "demo"},
    "cli": {"core", "data", "formats", "training", "inference", "evaluation", "serve", "vllm", "demo"},
}
LEAVES = {"options", "runtime"}  # modules at the top that import nothing from softprompt


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported softprompt module, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("softprompt"):
            assert node.level == 0, f"{path}: use absolute imports"
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                name = (
                    candidate
                    if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                    or (PACKAGE.parent / candidate.replace(".", "/")).is_dir()
                    else node.module
                )
                found.append((name, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names if a.name.startswith("softprompt")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute softprompt.* imports")
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_layer():
    loose = [
        m
        for m in GRAPH
        if m != "softprompt" and layer(m) not in ALLOWED and layer(m) not in LEAVES and m != "softprompt.__main__"
    ]
    assert loose == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    source = layer(module)
    if source is None or module == "softprompt.__main__":
        return  # the package root re-exports lazily; __main__ calls the CLI
    for target, _ in GRAPH[module]:
        dest = layer(target)
        if dest in (source, None) or dest in LEAVES:
            continue
        assert source not in LEAVES, f"{module} is a leaf but imports {target}"
        assert dest in ALLOWED[source], f"{module} ({source}) imports {target} ({dest}): against the layer order"


def test_no_import_cycles_at_module_level():
    edges = {m: {t for t, top in deps if top and t in GRAPH and t != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_the_library_has_no_argparse():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).parts[0] != "cli" and "argparse" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_no_test_module_imports_another():
    """Shared test code lives in conftest.py and the *_helpers.py modules, never in a test module."""
    tests = PACKAGE.parent / "tests"
    names = {p.stem for p in tests.rglob("test_*.py")}
    offenders = []
    for path in tests.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            found = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(tests)} imports {m}" for m in found if m.split(".")[0] in names]
    assert not offenders, offenders


def test_architecture_doc_lists_every_module():
    """docs/architecture.md names every module of every package in that package's bullet ("- `pkg/...`")."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    bullets: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        if line.startswith("- `") and "/" in line.split("`")[1]:
            current = line.split("`")[1].split("/")[0]
            bullets[current] = bullets.get(current, "") + line
        elif current and line.startswith("  "):
            bullets[current] += line
        else:
            current = None
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            if path.stem not in ("__init__", "__main__") and path.name not in doc:
                missing.append(path.name)
        elif path.name != "__init__.py" or parts[0] == "cli":
            if path.name not in bullets.get(parts[0], ""):
                missing.append("/".join(parts))
    assert not missing, f"docs/architecture.md does not describe: {', '.join(missing)}"
