"""Preemption: a SIGTERM'd run saves at a step every process agrees on, then exits with `PREEMPTED_EXIT_CODE`."""

from __future__ import annotations

import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run saved and stopped on SIGTERM; resubmit the same command.


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


class Preemption:
    """Decides, identically on every process, the step at which a SIGTERM'd job saves and stops.

    Multi-process runs (jax.distributed with its preemption service, the default) leave SIGTERM to JAX's own
    notifier: the coordination service tells every process, agrees on a step (the furthest any process
    has reached, plus one) and `reached_preemption_sync_point` turns true at that step everywhere. Until a
    notice arrives the per-step check is local, so no step waits on another host. A single process polls its
    own SIGTERM flag; several processes without the service agree by a max over their flags every step.
    """

    def __init__(self):
        self.raised = False
        self._previous = None
        self._service = jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)

    def __enter__(self):
        if self._service:
            return self  # a Python handler would replace JAX's SIGTERM notifier
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: finishing this step, saving, then exiting with %d", PREEMPTED_EXIT_CODE)
        self.raised = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process must ask at every step."""
        if self._service:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() > 1:
            return bool(np.max(multihost_utils.process_allgather(np.int32(self.raised))))
        return self.raised

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
