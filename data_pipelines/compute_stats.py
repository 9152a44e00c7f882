"""Computes the normalization statistics of OXE datasets once and writes them as JSON.

    python -m data_pipelines.compute_stats --data_dir=DIR --datasets=bridge,droid --out=stats.json

Point `config.data.stats_path` at the file; checkpoints save a copy next to the weights.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from data_pipelines.sources.rlds import BadRecordError
from data_pipelines.sources.shards import BadShardError
from data_pipelines.standardize import registry
from data_pipelines.standardize import stats as stats_lib

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.data_dir or not FLAGS.out:
        raise app.UsageError("--data_dir and --out are required")
    try:
        stats = stats_lib.compute_stats(
            FLAGS.data_dir,
            FLAGS.datasets or registry.known_datasets(),
            proprio_dim=FLAGS.proprio_dim,
            split=FLAGS.split,
            skip_bad_records=FLAGS.skip_bad_records,
            max_episodes=FLAGS.max_episodes,
            relative_horizon=FLAGS.relative_horizon,
        )
    except (BadShardError, BadRecordError) as e:
        print(f"ERROR: {e} (or pass --skip_bad_records)", file=sys.stderr)
        sys.exit(1)
    stats_lib.save_stats(stats, FLAGS.out)
    for name, entry in stats["datasets"].items():
        print(f"{name}: {entry['num_episodes']} episodes, {entry['num_transitions']} transitions")
    print(f"Wrote {FLAGS.out}")


if __name__ == "__main__":
    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    flags.DEFINE_string("data_dir", None, "Root of the TFDS datasets: <data_dir>/<name>/<version>/.")
    flags.DEFINE_list("datasets", None, "Dataset names (default: every registered dataset).")
    flags.DEFINE_string("out", None, "JSON file to write.")
    flags.DEFINE_integer("proprio_dim", 8, "Proprio is zero-padded to this many dims (data.proprio_dim).")
    flags.DEFINE_string("split", "train", "TFDS split to read.")
    flags.DEFINE_bool("skip_bad_records", False, "Skip and count unreadable shards and episodes instead of failing.")
    flags.DEFINE_integer("max_episodes", None, "Read at most this many episodes per dataset.")
    flags.DEFINE_integer("relative_horizon", 16, "Steps per chunk over which relative actions (an embodiment's "
                         "relative_to_state dimensions) are counted, relative to each chunk's start state.")
    app.run(main)
