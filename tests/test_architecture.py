"""The package's import rules (docs/ARCHITECTURE.md), read from the source with `ast`.

Every `import` counts, the ones inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spinlm"
RECIPES = ("spinlm.cli", "spinlm.loop", "spinlm.dpo", "spinlm.__main__", "spinlm.demo", "spinlm.experiment")
LEAVES = ("spinlm.errors", "spinlm.io", "spinlm.dist", "spinlm.progress", "spinlm.preempt")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ["spinlm", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (relative imports resolved; `from pkg import mod`
    counts as importing the module mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "spinlm"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "spinlm":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def within(name: str, groups: tuple[str, ...]) -> bool:
    return any(name == g or name.startswith(g + ".") for g in groups)


def is_stage(name: str) -> bool:
    return name.startswith("spinlm.stages.")


def violations(g: dict[str, set[str]]) -> list[str]:
    """Every broken rule, as one line each."""
    out = []
    for mod, deps in sorted(g.items()):
        for dep in sorted(deps):
            if is_stage(mod) and is_stage(dep):
                out.append(f"{mod} imports {dep}: a stage never imports another stage")
            if not within(mod, RECIPES) and within(dep, RECIPES):
                out.append(f"{mod} imports {dep}: only recipes import recipes")
            if not within(mod, RECIPES) and not is_stage(mod) and is_stage(dep):
                out.append(f"{mod} imports {dep}: the library never imports a stage")
            if within(mod, LEAVES) and not within(dep, LEAVES):
                out.append(f"{mod} imports {dep}: a leaf imports only leaves")
        if mod == "spinlm.loss" and deps:
            out.append(f"spinlm.loss imports {sorted(deps)}: the losses import nothing of the package")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(g)]
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group) + [sorted(group)[0]])

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_package_keeps_its_import_rules():
    assert violations(graph()) == []


def test_every_stage_and_group_is_where_the_architecture_page_says():
    mods = modules()
    for name in ("spinlm.stages.sft", "spinlm.stages.generate", "spinlm.stages.score", "spinlm.stages.train",
                 "spinlm.stages.evaluate", "spinlm.loop", "spinlm.loss", "spinlm.metrics", "spinlm.generation",
                 "spinlm.training.strategy", "spinlm.report.report", "spinlm.eval.judge", "spinlm.config"):
        assert name in mods, name
    page = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    groups = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    flat = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    missing = sorted(n for n in groups | flat if f"{n}/" not in page and f"`{n}`" not in page
                     and f"{n}.py" not in page)
    assert missing == [], f"docs/ARCHITECTURE.md does not mention {missing}"


@pytest.mark.parametrize("rule,files,expected", [
    ("stage -> stage", {"stages/__init__.py": "", "stages/a.py": "from spinlm.stages.b import f\n",
                        "stages/b.py": "def f(): pass\n"}, "a stage never imports another stage"),
    ("lazy stage -> stage", {"stages/__init__.py": "", "stages/b.py": "",
                             "stages/a.py": "def g():\n    from ..stages import b\n"},
     "a stage never imports another stage"),
    ("library -> stage", {"stages/__init__.py": "", "stages/a.py": "", "metrics.py": "from .stages.a import x\n"},
     "the library never imports a stage"),
    ("leaf -> library", {"io.py": "from spinlm import tokens\n", "tokens.py": ""}, "a leaf imports only leaves"),
    ("loss -> package", {"loss.py": "from spinlm.errors import UserError\n", "errors.py": ""},
     "the losses import nothing"),
    ("cycle", {"a.py": "from . import b\n", "b.py": "import spinlm.a\n"}, "import cycle: spinlm.a -> spinlm.b"),
    ("library -> recipe", {"loop.py": "", "tokens.py": "from spinlm.loop import run\n"}, "only recipes import"),
])
def test_each_rule_catches_its_violation(tmp_path, rule, files, expected):
    """The checker itself: a tiny package breaking one rule is reported (so a passing check means something)."""
    root = tmp_path / "spinlm"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    found = violations(graph(root))
    assert any(expected in v for v in found), (rule, found)
