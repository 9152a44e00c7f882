"""Import hygiene: inference loads without the data readers, and the model package does not import the exporters."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from train_utils import REPO, subprocess_env


def test_policy_imports_without_tensorflow_tfds_or_grain():
    code = ("import sys, wamjax.inference.policy\n"
            "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'grain') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(1), capture_output=True,
                            text=True, timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_models_do_not_import_the_exporters():
    """wamjax.export imports the models (to name and shape weights); the reverse would be a cycle."""
    folder = os.path.join(REPO, "wamjax", "models")
    offenders = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{name}:{node.lineno} {m}" for m in modules if m.startswith("wamjax.export")]
    assert not offenders, offenders
