"""Opening checks of ArrayRecord shards, shared by the OXE (RLDS) and captioned-video sources.

A half-copied shard (truncated: its footer and index are gone) otherwise fails deep inside the
ArrayRecord reader with a bare Riegeli `RuntimeError` that names neither the dataset nor the file.
Each shard is opened once, its record count read from its index and compared with what the dataset
metadata promises; the readers are closed again (the data sources reopen them lazily).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent import futures

from absl import logging
from array_record.python import array_record_module

# Opening a shard is one small read at its end: I/O-bound, so threads help on network filesystems.
_CHECK_THREADS = 16

_BAD_SHARDS: Counter[str] = Counter()
_BAD_SHARDS_LOCK = threading.Lock()


class BadShardError(ValueError):
    """A shard file that cannot be opened; names the dataset, the file and why."""

    def __init__(self, dataset: str, filename: str, reason: str):
        self.dataset, self.filename, self.reason = dataset, filename, reason
        super().__init__(f"Unreadable shard of dataset {dataset!r}, file {filename}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Sources holding these errors are pickled into Grain workers.
        return type(self), (self.dataset, self.filename, self.reason)


def shard_problem(path: str, expected_records: int | None = None) -> tuple[int, str | None]:
    """(records, None) when ArrayRecord shard `path` opens (with `expected_records`), else (0, reason)."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return 0, f"cannot stat the file ({e.strerror or e})"
    try:
        reader = array_record_module.ArrayRecordReader(path)
    except Exception as e:  # noqa: BLE001  The reader raises bare RuntimeErrors with Riegeli's status.
        return 0, f"cannot open it as ArrayRecord ({e or type(e).__name__}); {size} bytes"
    ok, records = reader.ok(), reader.num_records()
    try:
        reader.close()  # Raises the reader's failed status, if any: the only place its message appears.
        message = ""
    except Exception as e:  # noqa: BLE001
        ok, message = False, str(e)
    if not ok:
        detail = f": {message}" if message else ""
        return 0, f"not a readable ArrayRecord file (truncated or half-copied? {size} bytes){detail}"
    if expected_records is not None and records != expected_records:
        return records, f"holds {records} records, its dataset metadata says {expected_records}"
    return records, None


def check_shards(
    dataset: str,
    paths: Sequence[str],
    expected_records: Sequence[int | None] | None = None,
    *,
    skip_bad: bool = False,
    remedy: str = "re-copy the file",
) -> tuple[list[tuple[int, int]], list[BadShardError]]:
    """Opens every shard of `dataset`; returns ((index, records) of readable shards, unreadable ones).

    Without `skip_bad`, raises the `BadShardError` of the first unreadable shard (its message lists how
    many others there are). With it, each unreadable shard is counted (`bad_shard_counts`) and logged;
    a dataset without any readable shard raises all the same. `remedy` is the fix the error suggests.
    """
    expected = list(expected_records) if expected_records is not None else [None] * len(paths)
    if len(expected) != len(paths):
        raise ValueError(f"{dataset}: {len(paths)} shards but {len(expected)} expected record counts")
    with futures.ThreadPoolExecutor(max(1, min(_CHECK_THREADS, len(paths)))) as pool:
        results = list(pool.map(shard_problem, paths, expected))
    good = [(i, records) for i, (records, problem) in enumerate(results) if problem is None]
    bad = [BadShardError(dataset, path, problem) for path, (_, problem) in zip(paths, results, strict=True) if problem]
    if bad and not skip_bad:
        reason = bad[0].reason
        if len(bad) > 1:
            others = ", ".join(os.path.basename(e.filename) for e in bad[1:6])
            reason += f" (and {len(bad) - 1} more unreadable shards: {others})"
        reason += f"; {remedy}, or leave it out with data.skip_bad_records=True"
        raise BadShardError(dataset, bad[0].filename, reason)
    if bad and not good:
        # Skipping every shard would silently drop the whole dataset from a mixture.
        reason = f"none of the dataset's {len(paths)} shards is readable; this one: {bad[0].reason}"
        raise BadShardError(dataset, bad[0].filename, reason)
    for error in bad:
        with _BAD_SHARDS_LOCK:
            _BAD_SHARDS[dataset] += 1
            count = _BAD_SHARDS[dataset]
        logging.warning("Skipping (%d so far in %s): %s", count, dataset, error)
    return good, bad


def bad_shard_counts() -> dict[str, int]:
    """Unreadable shards skipped so far in this process, per dataset."""
    with _BAD_SHARDS_LOCK:
        return dict(_BAD_SHARDS)


def sliced_paths(paths: Sequence[str], records: Sequence[int]) -> list[str]:
    """`path[0:n]` names: ArrayRecord data sources take the record counts from them instead of
    reopening every shard to count its records."""
    return [f"{path}[0:{n}]" for path, n in zip(paths, records, strict=True)]
