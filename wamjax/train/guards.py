"""The non-finite guard: skipped non-finite updates counted, and the run stopped when too many come in a row."""

from __future__ import annotations

from typing import Any

import jax
from absl import logging


class NumericalFault(RuntimeError):
    """Too many non-finite steps in a row."""


class NonfiniteGuard:
    """Skips, counts and stops on non-finite steps without reading the device every step.

    optax.apply_if_finite already skips a non-finite update and counts them in a row on the device; the host
    only has to stop the run once the count passes `max_consecutive_nonfinite`. Each step's count stays on the
    device until the next fetch, where all of them come over in one transfer and are checked in step order, so
    the fault names the exact step and a checkpoint is never written past it. The trade-off: the run notices a
    fault only at the next log or checkpoint step, so up to `train.log_every - 1` more steps run (and are
    skipped, as their updates are non-finite too) before it stops.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self._pending: list[tuple[int, jax.Array]] = []
        self._last: dict[str, jax.Array] | None = None

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._pending.append((step, metrics["nonfinite_in_a_row"]))
        self._last = metrics

    def fetch(self) -> dict[str, Any]:
        """The newest step's metrics on the host, after checking every step since the last fetch."""
        steps = [s for s, _ in self._pending]
        last, counts = jax.device_get((self._last, [c for _, c in self._pending]))
        self._pending = []
        for step, count in zip(steps, counts, strict=True):
            count = int(count)
            if count > 0:
                logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, %d max)",
                                step, count, self.max_in_a_row)
            if count > self.max_in_a_row:
                raise NumericalFault(
                    f"step {step}: {count} non-finite steps in a row "
                    f"(optim.max_consecutive_nonfinite={self.max_in_a_row}); stopping with the last good "
                    "checkpoint kept"
                )
        return last
