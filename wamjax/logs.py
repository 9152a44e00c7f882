"""Log hygiene for the command-line programs: library INFO chatter stays out, warnings stay in."""

from __future__ import annotations

import logging as pylogging

from absl import logging

_NOISY = ("orbax", "grain", "etils", "absl/flags")


class QuietLibraries(pylogging.Filter):
    """Drops INFO records emitted from orbax, grain and etils (their per-operation progress)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in _NOISY)
        return record.levelno >= pylogging.WARNING or not noisy


def quiet_libraries() -> None:
    """Installs QuietLibraries on the absl handler (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, QuietLibraries) for f in handler.filters):
        handler.addFilter(QuietLibraries())
