"""Converts TFDS datasets stored as TFRecord (how OXE is published) to ArrayRecord for random access.

Run once on a local OXE copy; the result keeps the `<name>/[<config>/]<version>/` layout and every
metadata file, with each TFRecord shard rewritten record for record as an ArrayRecord shard:

    python -m data_pipelines.convert --src=/data/oxe_tfrecord --dst=/data/oxe --datasets=bridge,droid
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from concurrent import futures

import tensorflow as tf
from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter

_INFO = "dataset_info.json"


def list_datasets(src: str) -> list[str]:
    """Names of the dataset folders directly under `src`."""
    return sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)) and d != "downloads")


def _version_dirs(dataset_dir: str) -> list[str]:
    return sorted(root for root, _, files in os.walk(dataset_dir) if _INFO in files)


def _convert_shard(src_path: str, dst_path: str) -> int:
    # group_size:1 makes every record its own chunk, which random access by index needs to be fast.
    writer = ArrayRecordWriter(dst_path, "group_size:1")
    count = 0
    try:
        for record in tf.data.TFRecordDataset(src_path).as_numpy_iterator():
            writer.write(record)
            count += 1
    finally:
        writer.close()
    return count


def convert_version_dir(src_dir: str, dst_dir: str, num_workers: int = 4) -> int:
    """Converts one TFDS dataset version folder; returns how many records were written."""
    with open(os.path.join(src_dir, _INFO)) as f:
        info = json.load(f)
    file_format = info.get("fileFormat", "tfrecord")
    if file_format != "tfrecord":
        raise ValueError(f"{src_dir}: fileFormat is {file_format!r}, expected 'tfrecord'")
    os.makedirs(dst_dir, exist_ok=True)
    jobs = []
    for name in sorted(os.listdir(src_dir)):
        src_path = os.path.join(src_dir, name)
        if os.path.isdir(src_path):
            continue
        if ".tfrecord-" in name:
            jobs.append((src_path, os.path.join(dst_dir, name.replace(".tfrecord-", ".array_record-"))))
        elif name != _INFO:
            shutil.copy2(src_path, os.path.join(dst_dir, name))
    with futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        counts = list(pool.map(lambda job: _convert_shard(*job), jobs))
    for split in info.get("splits", []):
        expected = sum(int(n) for n in split.get("shardLengths", []))
        written = sum(c for (s, _), c in zip(jobs, counts, strict=True) if f"-{split['name']}.tfrecord-" in s)
        if expected and written != expected:
            raise ValueError(f"{src_dir}: split {split['name']!r} has {written} records, dataset_info says {expected}")
    info["fileFormat"] = "array_record"
    with open(os.path.join(dst_dir, _INFO), "w") as f:
        json.dump(info, f, indent=2)
    return sum(counts)


def convert(src: str, dst: str, datasets: Sequence[str] | None = None, *, num_workers: int = 4) -> list[str]:
    """Writes an ArrayRecord copy of each dataset in `datasets` (default: all) from `src` to `dst`.

    Returns the converted dataset names.
    """
    names = list(datasets) if datasets else list_datasets(src)
    missing = [n for n in names if not os.path.isdir(os.path.join(src, n))]
    if missing:
        raise FileNotFoundError(f"Datasets {missing} not found under {src}; it has {list_datasets(src)}")
    for name in names:
        version_dirs = _version_dirs(os.path.join(src, name))
        if not version_dirs:
            raise FileNotFoundError(f"Dataset {name!r}: no {_INFO} under {os.path.join(src, name)}")
        for version_dir in version_dirs:
            out = os.path.join(dst, os.path.relpath(version_dir, src))
            records = convert_version_dir(version_dir, out, num_workers)
            logging.info("Converted %s: %d records -> %s", version_dir, records, out)
    return names


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.src or not FLAGS.dst:
        raise app.UsageError("--src and --dst are required")
    names = convert(FLAGS.src, FLAGS.dst, FLAGS.datasets, num_workers=FLAGS.num_workers)
    print(f"Converted {len(names)} datasets to {FLAGS.dst}: {', '.join(names)}")


if __name__ == "__main__":
    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    flags.DEFINE_string("src", None, "Root holding TFRecord TFDS datasets: <src>/<name>/<version>/.")
    flags.DEFINE_string("dst", None, "Root to write the ArrayRecord copies to.")
    flags.DEFINE_list("datasets", None, "Dataset names to convert (default: every folder in --src).")
    flags.DEFINE_integer("num_workers", 4, "Shards converted in parallel.")
    app.run(main)
