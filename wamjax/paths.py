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
