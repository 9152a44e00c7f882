"""The README and docs/ stay true to the code, read statically (nothing trains or runs):

- every command in a ```bash block or an inline `python ...` / `launch/... ` span runs a module, script or
  launcher of this checkout, with flags that module defines (or a module it imports at load time, or absl), a
  `--config=` file that exists and loads with its argument, and `--config.` keys that file's config has;
- every repository path, dotted module name and `python` import the pages name exists;
- every relative link resolves, anchors included;
- the maps of the tree in README.md and docs/architecture.md name paths that exist, and the layering in
  docs/architecture.md names every part of the package once.

A flag in a command's trailing comment (`# --format=json`) is checked as one of the same module's; a
`--config.` override in a comment describes a later command and is not.
"""

from __future__ import annotations

import ast
import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import ml_collections
from train_utils import REPO

from wamjax import config_files

PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
PACKAGES = ("wamjax", "data_pipelines")  # importable top-level packages of this checkout
TOP_FOLDERS = ("wamjax", "data_pipelines", "configs", "launch", "benchmarks", "notebooks", "tests", "docs")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
REPO_PATH = re.compile(rf"^(?:{'|'.join(TOP_FOLDERS)})/[\w./-]*$")
DOTTED_NAME = re.compile(rf"^((?:{'|'.join(PACKAGES)})(?:\.\w+)+)")
SHELL_SEPARATORS = {"|", "||", "&&", ";", "&"}


# ---------------------------------------------------------------------------------------------- reading pages

def read(page: str) -> str:
    with open(os.path.join(REPO, page)) as f:
        return f.read()


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def fenced_blocks(page: str) -> list[tuple[str, str, int]]:
    """(language, body, line of the body's first line) of each fenced block."""
    text = read(page)
    return [(m.group(1), m.group(2), line_of(text, m.start(2))) for m in FENCE.finditer(text)]


def prose(page: str) -> str:
    """The page with fenced blocks blanked out, line numbers kept."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), read(page))


def code_spans(page: str) -> list[tuple[str, int]]:
    """Inline code spans outside fenced blocks, whitespace runs joined, with their line."""
    text = prose(page)
    return [(" ".join(m.group(2).split()), line_of(text, m.start())) for m in CODE_SPAN.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(page: str) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose(page)):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


# ------------------------------------------------------------------------------------- modules and their flags

def module_file(name: str) -> str | None:
    """The file of module `name` in this checkout (never an installed copy elsewhere), or None."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if (spec is None or not spec.origin or not os.path.isfile(spec.origin) or not spec.origin.endswith(".py")
            or not os.path.abspath(spec.origin).startswith(REPO + os.sep) or "site-packages" in spec.origin):
        return None
    return spec.origin


@functools.cache
def parse(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read(), path)


def is_main_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def load_time_statements(body: list[ast.stmt], entry: bool):
    """Statements that run when the file loads: not function or class bodies; the `__main__` block only when the
    file is the one run."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.If) and is_main_guard(node.test) and not entry:
            continue
        yield node
        for field in ("body", "orelse", "finalbody"):
            yield from load_time_statements(getattr(node, field, []), entry)
        for handler in getattr(node, "handlers", []):
            yield from load_time_statements(handler.body, entry)


def called_functions(tree: ast.Module, entry: bool) -> set[str]:
    """Names of module-level functions called at load time (`define_flags()` under `__main__`)."""
    names = set()
    for node in load_time_statements(tree.body, entry):
        if not isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            names |= {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    return names


def imported_files(tree: ast.Module, statements) -> set[str]:
    """Files of this checkout that the statements import (with their parent packages)."""
    names = set()
    for node in statements:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    files = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path:
                files.add(path)
    return files


@functools.cache
def own_flags(path: str, entry: bool) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(flag names, boolean flag names, imported files) of one file as it loads (`entry`: as the file run): its
    DEFINE_* calls at load time or in the functions it calls then."""
    tree = parse(path)
    statements = list(load_time_statements(tree.body, entry))
    called = called_functions(tree, entry)
    scopes = [s for s in statements if not isinstance(s, (ast.If, ast.Try, ast.With, ast.For, ast.While))]
    scopes += [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name in called]
    names, booleans = set(), set()
    for scope in scopes:
        for call in ast.walk(scope):
            if not isinstance(call, ast.Call):
                continue
            func = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
            if not func.startswith("DEFINE"):
                continue
            arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "name"), None)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(arg.value)
                if func in ("DEFINE_bool", "DEFINE_boolean"):
                    booleans.add(arg.value)
    return frozenset(names), frozenset(booleans), frozenset(imported_files(tree, statements))


@functools.cache
def flag_definitions(path: str) -> tuple[frozenset[str], frozenset[str]]:
    """(flag names, boolean flag names) defined when `path` is run: its own and those of every file of this
    checkout it imports at load time, directly or not."""
    names, booleans, todo = set(), set(), [(path, True)]
    seen = {path}
    while todo:
        current, entry = todo.pop()
        more, more_booleans, imported = own_flags(current, entry)
        names |= more
        booleans |= more_booleans
        todo += [(f, False) for f in imported - seen]
        seen |= imported
    return frozenset(names), frozenset(booleans)


@functools.cache
def absl_flags() -> frozenset[str]:
    """The flags absl itself defines for every program (--logtostderr, --verbosity, ...)."""
    code = "from absl import app, flags, logging; print('\\n'.join(flags.FLAGS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return frozenset(out.stdout.split())


@functools.cache
def top_level_names(path: str) -> frozenset[str]:
    """Names a module defines at load time, plus the string constants of a module with a `__getattr__` (its lazy
    names)."""
    tree = parse(path)
    names = set()
    lazy = False
    for node in load_time_statements(tree.body, False):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            lazy |= node.name == "__getattr__"
    if lazy:
        names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return frozenset(names)


def check_dotted_name(dotted: str) -> str | None:
    """`a.b.c.Name` names a module of this checkout, or a name that module defines; else what is wrong."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:i]))
        if path:
            if i == len(parts) or parts[i] in top_level_names(path):
                return None
            module = ".".join(parts[:i])
            return f"no module {module}.{parts[i]}, nor a name {parts[i]!r} in {module} (in {dotted})"
    return f"no module {dotted}"


# ------------------------------------------------------------------------------------------------- commands

@functools.cache
def load_config(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    return config_files.get_config(f"{os.path.join(REPO, path)}:{arg}" if arg else os.path.join(REPO, path))


def has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def split_comment(line: str) -> tuple[str, str]:
    """(command, trailing comment): a `#` outside quotes, at the start or after a blank."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:]
    return line, ""


def logical_lines(body: str, first_line: int):
    """(line number, text) of each command line, backslash continuations joined."""
    lines = body.split("\n")
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        yield first_line + start, text
        i += 1


def invocation(tokens: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, target, arguments) of the first `python -m MODULE`, `python SCRIPT.py` or `launch/...` in a command."""
    for i, token in enumerate(tokens):
        if os.path.basename(token) in ("python", "python3"):
            if tokens[i + 1:i + 2] == ["-m"] and i + 2 < len(tokens):
                kind, target, args = "module", tokens[i + 2], tokens[i + 3:]
            elif i + 1 < len(tokens) and tokens[i + 1].endswith(".py"):
                kind, target, args = "script", tokens[i + 1], tokens[i + 2:]
            else:
                return None
        elif token.startswith("launch/"):
            kind, target, args = "launcher", token, tokens[i + 1:]
        else:
            continue
        end = next((j for j, a in enumerate(args) if a in SHELL_SEPARATORS or a == "--"), len(args))
        return kind, target, args[:end]
    return None


def check_command(command: str, comment: str = "") -> list[str]:
    """What is wrong with one shell command line (empty: nothing, or not a command of ours)."""
    try:
        tokens = shlex.split(command)
    except ValueError as e:
        return [f"cannot split {command!r}: {e}"]
    found = invocation(tokens)
    if found is None:
        return []
    kind, target, args = found
    if kind == "module":
        path = module_file(target)
        if path is None:
            return [f"no module {target} in this checkout"]
        defined, booleans = flag_definitions(path)
    elif kind == "script":
        path = os.path.join(REPO, target)
        if not os.path.isfile(path):
            return [f"no script {target}"]
        defined, booleans = flag_definitions(path)
    else:  # every launcher in launch/ passes its flags to wamjax.main
        if not os.path.isfile(os.path.join(REPO, target)):
            return [f"no launcher {target}"]
        target = "wamjax.main"
        defined, booleans = flag_definitions(module_file(target))
    defined |= absl_flags()
    flags = [a for a in args if a.startswith("--")]
    flags += [f for f in re.findall(r"--[A-Za-z_]\w*(?:\.\w+)*", comment) if "." not in f]
    errors = []
    config = None
    for flag in flags:
        name, _, value = flag[2:].partition("=")
        if name == "config" and "config" in defined and value:
            if not os.path.isfile(os.path.join(REPO, value.partition(":")[0])):
                errors.append(f"{target}: no config file {value.partition(':')[0]}")
                continue
            try:
                config = load_config(value)
            except Exception as e:  # noqa: BLE001 - the message is the report
                errors.append(f"{target}: --config={value} does not load: {type(e).__name__}: {e}")
    for flag in flags:
        name = flag[2:].partition("=")[0]
        if name.startswith("config."):
            if "config" not in defined:
                errors.append(f"{target} defines no --config, yet {flag} is given")
            elif config is not None and not has_key(config, name[len("config."):]):
                errors.append(f"{target}: the config has no key {name[len('config.'):]} ({flag})")
        elif name not in defined and not (name.startswith("no") and name[2:] in booleans):
            errors.append(f"{target} defines no flag --{name}")
    return errors


def page_commands(page: str):
    """(line, command, trailing comment) of every command: lines of ```bash blocks, and spans that start with
    `python `, `bash ` or a launcher and its arguments."""
    for language, body, first_line in fenced_blocks(page):
        if language in ("bash", "sh", "shell"):
            for line, text in logical_lines(body, first_line):
                command, comment = split_comment(text)
                if command.strip():
                    yield line, command, comment
    for span, line in code_spans(page):
        if re.match(r"(python |bash |launch/\S+ )", span):
            yield line, span, ""


# --------------------------------------------------------------------------------------------------- tests

def test_commands_name_real_modules_flags_configs_and_keys():
    errors, commands = [], 0
    for page in PAGES:
        for line, command, comment in page_commands(page):
            problems = check_command(command, comment)
            commands += invocation(shlex.split(command)) is not None
            errors += [f"{page}:{line}: {p}" for p in problems]
    assert commands >= 30, f"only {commands} commands found in {PAGES}: is the parser still reading the pages?"
    assert not errors, "\n".join(errors)


def test_config_spans_load():
    errors = []
    for page in PAGES:
        for span, line in code_spans(page):
            m = re.fullmatch(r"--config=(\S+)", span)
            if m:
                try:
                    load_config(m.group(1))
                except Exception as e:  # noqa: BLE001 - the message is the report
                    errors.append(f"{page}:{line}: {span} does not load: {type(e).__name__}: {e}")
    assert not errors, "\n".join(errors)


def test_named_paths_and_modules_exist():
    errors = []
    for page in PAGES:
        for span, line in code_spans(page):
            if REPO_PATH.match(span) and not os.path.exists(os.path.join(REPO, span)):
                errors.append(f"{page}:{line}: no file or folder {span}")
            m = DOTTED_NAME.match(span)
            if m and not span.startswith("python "):
                problem = check_dotted_name(m.group(1))
                if problem:
                    errors.append(f"{page}:{line}: {problem}")
    assert not errors, "\n".join(errors)


def test_python_examples_parse_and_import_real_names():
    errors = []
    for page in PAGES:
        for language, body, first_line in fenced_blocks(page):
            if language != "python":
                continue
            try:
                tree = ast.parse(body)
            except SyntaxError as e:
                errors.append(f"{page}:{first_line + (e.lineno or 1) - 1}: does not parse: {e.msg}")
                continue
            for node in ast.walk(tree):
                line = first_line + getattr(node, "lineno", 1) - 1
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                    names = [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                errors += [f"{page}:{line}: {p}" for p in map(check_dotted_name, names) if p]
    assert not errors, "\n".join(errors)


def test_relative_links_resolve():
    errors, links = [], 0
    for page in PAGES:
        text = CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), prose(page))
        for m in LINK.finditer(text):
            target, line = m.group(1), line_of(text, m.start())
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            links += 1
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(REPO, resolved)):
                errors.append(f"{page}:{line}: link {target} -> {resolved} does not exist")
            elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
                errors.append(f"{page}:{line}: link {target}: {resolved} has no heading #{anchor}")
    assert links >= 10, f"only {links} relative links found: is the parser still reading the pages?"
    assert not errors, "\n".join(errors)


def tree_map_paths(body: str) -> list[str]:
    """Paths of a map of the tree: an entry per line (`name/` a folder, two spaces of indent per level, then its
    description); lines indented past the entries' column continue a description."""
    paths, stack = [], []
    for text in body.splitlines():
        indent = len(text) - len(text.lstrip())
        if not text.strip() or indent >= 20:
            continue
        name = text.split()[0]
        depth = indent // 2
        stack[depth:] = [name.rstrip("/")]
        paths.append("/".join(stack))
    return paths


def test_tree_maps_name_real_paths():
    errors = []
    for page, heading in (("README.md", "Map of the tree"), (os.path.join("docs", "architecture.md"), "Layout")):
        section = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", read(page), re.S | re.M)
        block = FENCE.search(section.group(1)) if section else None
        assert block, f"{page} has no '## {heading}' section with the map of the tree in a fenced block"
        paths = tree_map_paths(block.group(2))
        assert len(paths) > 20, paths
        missing = [p for p in paths if not os.path.exists(os.path.join(REPO, p))]
        if missing:
            errors.append(f"{page}'s map of the tree names paths that do not exist: {missing}")
    assert not errors, "\n".join(errors)


def layering() -> list[list[str]]:
    """docs/architecture.md's layering, lowest first: one fenced line per layer, its parts comma-separated."""
    text = read(os.path.join("docs", "architecture.md"))
    section = re.search(r"^## Layering\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "docs/architecture.md has no '## Layering' section"
    block = FENCE.search(section.group(1))
    assert block, "docs/architecture.md's layering is a fenced block"
    return [[p.strip() for p in line.split(",") if p.strip()] for line in block.group(2).splitlines() if line.strip()]


def test_layering_names_every_part_once():
    layers = layering()
    parts = [p for layer in layers for p in layer]
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    assert not repeated, f"parts named in more than one layer: {repeated}"
    top_level = {"data_pipelines", "benchmarks", "configs"}

    def exists(part: str) -> bool:
        if part in top_level:
            return os.path.isdir(os.path.join(REPO, part))
        return (os.path.isdir(os.path.join(REPO, "wamjax", part))
                or os.path.isfile(os.path.join(REPO, "wamjax", f"{part}.py")))

    missing = [p for p in parts if not exists(p)]
    assert not missing, f"the layering names parts that do not exist: {missing}"
    package = {os.path.splitext(n)[0] for n in os.listdir(os.path.join(REPO, "wamjax"))
               if (n.endswith(".py") and n != "__init__.py")
               or os.path.isfile(os.path.join(REPO, "wamjax", n, "__init__.py"))}
    unplaced = sorted(package - set(parts))
    assert not unplaced, f"parts of wamjax/ the layering does not place: {unplaced}"
