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
# params), the stage entry point, the command line, and the exception type.
PLUMBING = {"config", "stage", "cli", "errors", "__init__"}


def _module_file(name: str) -> Path:
    return REPO / PACKAGE / f"{name}.py"


def imports_of(path: Path) -> set[str]:
    """The tierquant modules `path` imports anywhere in it (names without the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    in_package = path.parent.name == PACKAGE
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and in_package:
                base = module.split(".")[0] if module else ""
            elif node.level == 0 and module.split(".")[0] == PACKAGE:
                base = module.split(".")[1] if "." in module else ""
            else:
                continue
            if base:
                found.add(base)
            else:  # `from . import x` / `from tierquant import x`
                found.update(a.name for a in node.names)
    return {m for m in found if _module_file(m).is_file()}


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
            Path(d).stem
            for d in stage.get("deps", [])
            if isinstance(d, str) and d.startswith(f"{PACKAGE}/") and d.endswith(".py")
        }
        assert script.group(1) in stage.get("deps", []), f"stage {name}: script not a dep"
        needed = closure(REPO / script.group(1))
        for module in sorted(needed - declared):
            problems.append(f"stage {name}: imports {PACKAGE}/{module}.py, not in its deps")
        for module in sorted(declared - needed):
            problems.append(f"stage {name}: declares {PACKAGE}/{module}.py, which it never runs")
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
    graph = {p.stem: imports_of(p) - {p.stem} for p in (REPO / PACKAGE).glob("*.py")}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_a_cycle_and_lazy_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    # a function-level import counts: tierquant.evaluate loads the corpus lazily
    assert "tokenizer" in imports_of(_module_file("evalset"))
