"""dvc.yaml declares exactly the code each stage runs, and tierquant has no import cycle.

Each stage's `deps:` lists the modules of tierquant/ its script imports, directly or
through other tierquant modules (static: every `import` in the file, function-level ones
included, read with `ast`), one file per module: a change to a module reruns exactly the
stages that run it, and `dvc exp run -S tiers.X=...` keeps the others cached (depending
on the whole package would rerun every stage for any edit). Config and CLI plumbing is
not a dep: its params are declared as params, and it decides no output byte.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "tierquant"
# Plumbing, not output: the params schema and its loading (params are declared as
# params), the stage entry point and its in-process runner, the command line, the cache
# tool, the exception type,
# and the packages' __init__ files (docstrings only: test_subpackage_inits_hold_no_code).
PLUMBING = {"config", "stage", "cli", "dvccache", "errors", "pipeline"}


def _module_file(name: str) -> Path:
    """tierquant/core/files.py for "core.files"; tierquant/core/__init__.py for "core"."""
    path = REPO / PACKAGE / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO / PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _resolve(dotted: str, names: list[str]) -> set[str]:
    """The modules an import of `names` from package-relative `dotted` loads."""
    found: set[str] = set()
    for name in names:
        sub = f"{dotted}.{name}" if dotted else name
        if _module_file(sub).is_file() and sub.split(".")[-1] != "__init__":
            found.add(sub)
        elif dotted:
            found.add(dotted)
    if not names and dotted:
        found.add(dotted)
    return {m for m in found if m and _module_file(m).is_file()}


def imports_of(path: Path) -> set[str]:
    """The tierquant modules `path` imports anywhere in it, as dotted names inside the
    package ("core.files"); a package's __init__ counts only where it is imported itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    inside = PACKAGE in path.relative_to(REPO).parts[:1]
    here = _module_name(path).split(".") if inside else []
    package_of_path = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found |= _resolve(".".join(parts[1:-1]), [parts[-1]])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level and inside:
                base = package_of_path[: len(package_of_path) - (node.level - 1)]
                dotted = ".".join([*base, *module.split(".")] if module else base)
            elif node.level == 0 and module.split(".")[0] == PACKAGE:
                dotted = module.partition(".")[2]
            else:
                continue
            found |= _resolve(dotted, [a.name for a in node.names])
    return {m for m in found if "." in m or m in PLUMBING or _module_file(m).name != "__init__.py"}


def closure(script: Path) -> set[str]:
    """tierquant modules `script` runs: its imports and theirs, not through plumbing."""
    seen: set[str] = set()
    todo = [m for m in imports_of(script) if m not in PLUMBING]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [m for m in imports_of(_module_file(module)) if m not in PLUMBING]
    return seen


def library_modules() -> dict[str, Path]:
    """Every module of the package by dotted name, __init__ files excluded."""
    return {_module_name(p): p for p in (REPO / PACKAGE).rglob("*.py") if p.name != "__init__.py"}


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, `foreach` ones by their `do:` body."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    return {name: body.get("do", body) for name, body in doc["stages"].items()}


def test_every_stage_declares_exactly_the_modules_it_imports():
    problems = []
    for name, stage in stages().items():
        script = re.search(r"python (stages/\S+\.py)", stage["cmd"])
        assert script, f"stage {name}: cmd {stage['cmd']!r} runs no stages/*.py script"
        declared = {
            _module_name(REPO / d)
            for d in stage.get("deps", [])
            if isinstance(d, str) and d.startswith(f"{PACKAGE}/") and d.endswith(".py")
        }
        assert script.group(1) in stage.get("deps", []), f"stage {name}: script not a dep"
        needed = closure(REPO / script.group(1))
        for module in sorted(needed - declared):
            problems.append(
                f"stage {name}: imports {_module_file(module).relative_to(REPO)}, not in its deps"
            )
        for module in sorted(declared - needed):
            path = _module_file(module).relative_to(REPO)
            problems.append(f"stage {name}: declares {path}, which it never runs")
    assert not problems, "dvc.yaml deps drifted from the imports:\n" + "\n".join(problems)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_tierquant_modules():
    graph = {name: imports_of(p) - {name} for name, p in library_modules().items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_among_subpackages():
    def package(module: str) -> str:
        """The subpackage; at the top, the exception type is the layer below everything
        and the rest (config, entry point, CLI) the layer above."""
        if "." in module:
            return module.split(".")[0]
        return "errors" if module == "errors" else "(top)"

    graph: dict[str, set[str]] = {}
    for name, path in library_modules().items():
        graph.setdefault(package(name), set()).update(
            package(m) for m in imports_of(path) if package(m) != package(name)
        )
    for targets in list(graph.values()):
        for t in targets:
            graph.setdefault(t, set())
    cycle = _cycle(graph)
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle or [])


def test_subpackage_inits_hold_no_code():
    """Each subpackage's __init__.py is its docstring: importing a module of it runs
    nothing else, so a module's deps are its own imports."""
    for init in (REPO / PACKAGE).glob("*/__init__.py"):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree)
        assert doc, f"{init.relative_to(REPO)}: no docstring saying what the subpackage is"
        assert len(tree.body) == 1, f"{init.relative_to(REPO)}: code besides its docstring"


def test_top_level_is_plumbing_plus_subpackages():
    top = {p.stem for p in (REPO / PACKAGE).glob("*.py")} - {"__init__"}
    assert top <= PLUMBING, (
        f"modules at the top of tierquant/ beside the plumbing: {top - PLUMBING}"
    )


def test_the_checks_see_a_cycle_and_lazy_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    # a function-level import counts: the CLI imports the cache tool inside a function
    assert "check.cache" in imports_of(_module_file("cli"))
    assert _module_name(_module_file("core.files")) == "core.files"
