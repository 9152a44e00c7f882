"""Training entry point.

  python -m wamjax.main --config=configs/wam.py:size=tiny,stage=video_pretrain --workdir=DIR --config.train.steps=50

Exit codes: 0 done; 75 preempted (SIGTERM) after saving a checkpoint: run the same command again to resume;
1 error (including a numerical fault: too many non-finite steps in a row).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from wamjax.logs import quiet_libraries

_STARTED = time.time()  # goodput counts what follows (JAX's import, distributed init) as init

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/wam.py:size=tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed(dist) -> None:
    """Calls jax.distributed.initialize when configured, or (`auto`) in a SLURM job, a GKE/multislice TPU job
    or on a Cloud TPU VM."""
    import jax

    mode = str(dist.initialize).lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"distributed.initialize={dist.initialize!r}; expected auto, true or false")
    if mode == "false":
        return
    explicit = bool(dist.coordinator_address)
    detected = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    # A Cloud TPU VM (TPU chips plus libtpu): jax.distributed finds its workers from the VM's metadata.
    detected = detected or bool(glob.glob("/dev/accel*") and importlib.util.find_spec("libtpu"))
    if mode == "auto" and not (explicit or detected):
        return
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=dist.coordinator_address,
            num_processes=int(dist.num_processes),
            process_id=int(dist.process_id),
        )
    if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def main(argv) -> None:
    quiet_libraries()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    maybe_initialize_distributed(config.distributed)

    from wamjax.eval.hooks import loop_hooks  # the training stack: once jax.distributed is initialized
    from wamjax.train.guards import NumericalFault  # the same
    from wamjax.train.loop import train  # the same

    try:
        train(config, _WORKDIR.value, started=_STARTED, hooks=loop_hooks())
    except NumericalFault as e:
        logging.error("%s", e)
        raise SystemExit(1) from e


if __name__ == "__main__":
    app.run(main)
