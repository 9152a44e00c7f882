"""One way in to a dataset's episodes, whatever its format: TFDS/RLDS by name, LeRobot by `lerobot:<path>`."""

from __future__ import annotations

from collections.abc import Sequence

from data_pipelines.sources import lerobot
from data_pipelines.sources.rlds import EpisodeSource
from data_pipelines.standardize import registry

EpisodeReader = EpisodeSource | lerobot.LeRobotSource


def open_episodes(
    data_dir: str, name: str, split: str = "train", *, skip_bad_shards: bool = False, cameras: Sequence[str] = ()
) -> EpisodeReader:
    """Random-access standardized episodes of `data.datasets` entry `name` under `data_dir`, one split."""
    reader = lerobot.LeRobotSource if lerobot.is_lerobot(name) else EpisodeSource
    return reader(data_dir, name, split, skip_bad_shards=skip_bad_shards, cameras=tuple(cameras))


def dataset_spec(data_dir: str, name: str) -> registry.DatasetSpec:
    """The standardization of dataset entry `name`: the registry's for an OXE name, the layout of a LeRobot
    dataset read from its meta/info.json."""
    if lerobot.is_lerobot(name):
        return lerobot.dataset_spec(lerobot.dataset_root(data_dir, name), name)
    return registry.get_spec(name)
