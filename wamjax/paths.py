"""Paths for workdirs, checkpoints and exports: local, or any etils.epath URI (gs://, s3://, ...).

A URI stays a URI: `gs://bucket/run` is never turned into a local `<cwd>/gs:/bucket/run`.
"""

from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def is_uri(path: PathLike) -> bool:
    """Whether `path` names a remote location (`scheme://...`) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """An epath.Path for `path`: URIs as given, local paths made absolute (a later chdir cannot move them).

    A URI scheme that etils.epath does not know is refused, naming the path, instead of being read as a local
    relative path.
    """
    text = os.fspath(path)
    try:
        result = epath.Path(text)
    except KeyError as e:
        raise ValueError(f"{text}: unsupported path scheme {e}; use a local path or gs://, s3://, az://, hf://") from e
    return result if is_uri(text) else result.expanduser().resolve()


ROLL_LINES = 256  # lines per part of a rolled log on an object store


def log_parts(path: PathLike) -> list[epath.Path]:
    """The parts of a line log in order: `path`, then `path.000001`, `path.000002`, ... (see `LineLog`)."""
    path = as_path(path)
    parts = [path] if path.exists() else []
    if path.parent.exists():
        rolled = [p for p in path.parent.glob(f"{path.name}.*") if p.name[len(path.name) + 1:].isdigit()]
        parts += sorted(rolled, key=lambda p: int(p.name[len(path.name) + 1:]))
    return parts


def read_log_lines(path: PathLike) -> list[str]:
    """Every line of a line log (all its parts, in order), each with its newline."""
    lines: list[str] = []
    for part in log_parts(path):
        lines += part.read_text().splitlines(keepends=True)
    return lines


class LineLog:
    """An append-only text log of lines at `path`, local or on an object store.

    A local file is appended to. An object store cannot append, so there the log is rolled: each write
    rewrites only the newest part (`path`, then `path.000001`, ...), and a part holding `roll_lines` lines is
    left as it is; a write costs at most `roll_lines` lines whatever the log's length. `read_log_lines` reads
    either back. A new LineLog on an existing log continues it.
    """

    def __init__(self, path: PathLike, roll_lines: int = ROLL_LINES):
        self.path = as_path(path)
        self.roll_lines = int(roll_lines)
        self._append = not is_uri(self.path)
        self._part: int | None = None  # index of the newest part (0: `path` itself)
        self._lines: list[str] = []  # the newest part's lines

    def _part_path(self, index: int) -> epath.Path:
        return self.path if index == 0 else self.path.parent / f"{self.path.name}.{index:06d}"

    def _open(self) -> None:
        parts = log_parts(self.path)
        self._part = len(parts) - 1 if parts else 0
        self._lines = parts[-1].read_text().splitlines(keepends=True) if parts else []

    def write(self, text: str) -> None:
        """Appends `text` (whole lines)."""
        if self._append:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(text)
            return
        if self._part is None:
            self._open()
        if len(self._lines) >= self.roll_lines:
            self._part, self._lines = self._part + 1, []
        self._lines += text.splitlines(keepends=True)
        self._part_path(self._part).write_text("".join(self._lines))

    def rewrite(self, lines: list[str]) -> None:
        """Replaces the whole log with `lines` (a resume dropping what it redoes): rolled parts no longer
        needed are removed; each part is replaced whole, never left half written."""
        if self._append:
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text("".join(lines))
            tmp.replace(self.path)
            return
        old = log_parts(self.path)
        chunks = [lines[i:i + self.roll_lines] for i in range(0, len(lines), self.roll_lines)] or [[]]
        for index, chunk in enumerate(chunks):
            self._part_path(index).write_text("".join(chunk))
        for stale in old[len(chunks):]:
            stale.unlink()
        self._part, self._lines = len(chunks) - 1, list(chunks[-1])
