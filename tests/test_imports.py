"""Import rules: every part imports only parts at or below its layer (docs/architecture.md), function-level
imports included; no import loop between parts; a deferred project import says what it defers; inference loads
without the data readers."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections import defaultdict

from train_utils import REPO, subprocess_env

PACKAGES = ("wamjax", "data_pipelines", "configs", "benchmarks")


def layers() -> dict[str, int]:
    """Part name -> layer index, from the fenced block under docs/architecture.md's "## Layering"."""
    with open(os.path.join(REPO, "docs", "architecture.md")) as f:
        text = f.read()
    section = text.split("## Layering", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    table = {}
    for index, line in enumerate(x for x in block.splitlines() if x.strip()):
        for name in line.split(","):
            table[name.strip()] = index
    return table


def part_of(module: str) -> str | None:
    """wamjax.models.dit -> models; data_pipelines.sources.rlds -> data_pipelines; others -> None."""
    head, _, rest = module.partition(".")
    if head == "wamjax":
        return rest.split(".")[0] if rest else None
    return head if head in PACKAGES else None


def project_imports() -> list[tuple[str, int, str, str, bool, str]]:
    """(file, line, importing part, imported module, inside a function, source line) of every project import."""
    found = []
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, REPO)
                module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                with open(path) as f:
                    source = f.read()
                lines = source.splitlines()
                tree = ast.parse(source)
                in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                               for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)}
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.level == 0:
                        targets = [node.module or ""]
                        if node.module in PACKAGES:  # `from wamjax import msgpack_numpy`: the names are modules
                            targets = [f"{node.module}.{a.name}" for a in node.names]
                    elif isinstance(node, ast.Import):
                        targets = [a.name for a in node.names]
                    else:
                        continue
                    for target in targets:
                        if part_of(target) is not None:
                            found.append((rel, node.lineno, part_of(module), target, id(node) in in_function,
                                          lines[node.lineno - 1]))
    return found


def test_every_part_is_in_a_layer():
    table = layers()
    parts = {p for _, _, p, _, _, _ in project_imports()} | {part_of(t) for _, _, _, t, _, _ in project_imports()}
    folder = os.path.join(REPO, "wamjax")
    parts |= {n.removesuffix(".py") for n in os.listdir(folder)
              if not n.startswith(("_", ".")) and (n.endswith(".py") or os.path.isdir(os.path.join(folder, n)))}
    missing = sorted(p for p in parts if p and p not in table)
    assert not missing, f"parts missing from docs/architecture.md's layering: {missing}"


def test_no_import_against_the_layering():
    """Lower parts never import higher ones, not even inside a function."""
    table = layers()
    offenders = [f"{f}:{line} ({src} -> {part_of(target)}) {target}"
                 for f, line, src, target, _, _ in project_imports()
                 if src in table and part_of(target) in table and table[part_of(target)] > table[src]]
    assert not offenders, "imports against the layering:\n" + "\n".join(offenders)


def test_no_import_loop_between_parts():
    """Parts of one layer may import each other one way only (module-level and function-level imports alike)."""
    edges = defaultdict(set)
    for _, _, src, target, _, _ in project_imports():
        if src and part_of(target) != src:
            edges[src].add(part_of(target))
    loops = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))
    assert not loops, f"parts importing each other: {loops}"


def test_deferred_project_imports_say_why():
    """In the packages, a project import inside a function defers something heavy; its line says what (a comment).
    Benchmark scripts may defer freely."""
    silent = [f"{f}:{line}: {text.strip()}" for f, line, _, _, inside, text in project_imports()
              if inside and "#" not in text and f.startswith(("wamjax", "data_pipelines"))]
    assert not silent, "function-level project imports without a comment:\n" + "\n".join(silent)


def test_policy_imports_without_tensorflow_tfds_or_grain():
    code = ("import sys, wamjax.inference.policy\n"
            "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'grain') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(1), capture_output=True,
                            text=True, timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_the_rules_see_function_level_imports():
    """The scan finds imports inside functions (the ones that hid package-level loops before)."""
    inside = [t for _, _, _, t, fn, _ in project_imports() if fn]
    assert any(t.startswith("wamjax.sim") for t in inside), inside[:5]
