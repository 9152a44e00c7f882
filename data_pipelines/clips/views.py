"""Several cameras per clip: which ones (`data.cameras`) and how they reach the model (`data.view_layout`).

`tile` (DreamZero): each view is resized to one cell of a near-square grid and the cells are laid out row by
row in one frame of `data.resolution`, empty cells black (three views -> a 2x2 grid); the model sees one
camera. `tokens`: the views stay a separate axis of the clip, `frames` [T, V, H, W, 3] at `data.resolution`
each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections
import numpy as np

VIEW_LAYOUTS = ("tile", "tokens")


def camera_names(data_config: ml_collections.ConfigDict) -> list[str]:
    """`data.cameras` as a list (a comma-separated string or a sequence); empty: the primary camera alone."""
    cameras = data_config.get("cameras", "")
    if isinstance(cameras, str):
        cameras = cameras.split(",")
    return [c.strip() for c in cameras if c.strip()]


def view_layout(data_config: ml_collections.ConfigDict) -> str:
    """`data.view_layout`, checked."""
    layout = data_config.get("view_layout", "tile")
    if layout not in VIEW_LAYOUTS:
        raise ValueError(f"data.view_layout={layout!r}; expected one of {VIEW_LAYOUTS}")
    return layout


def num_views(data_config: ml_collections.ConfigDict) -> int:
    """How many cameras a clip carries (1 when `data.cameras` is empty)."""
    return max(len(camera_names(data_config)), 1)


def model_views(data_config: ml_collections.ConfigDict) -> int:
    """How many views the model sees: 1 when tiled, else the number of cameras."""
    return num_views(data_config) if view_layout(data_config) == "tokens" else 1


def views_axis(data_config: ml_collections.ConfigDict) -> int | None:
    """Length of the views axis of a clip's `frames` ([T, V, H, W, 3], tokens layout with `data.cameras` set), or
    None when the frames carry none (one camera, or tiled cameras)."""
    if view_layout(data_config) != "tokens" or not camera_names(data_config):
        return None
    return num_views(data_config)


def dataset_cameras(name: str, cameras: Sequence[str], data_dir: str = "") -> tuple[str, ...]:
    """Observation keys of `cameras` (keys or roles) in dataset `name` (a LeRobot one under `data_dir`); a missing
    one is named with the dataset and the cameras it has."""
    from data_pipelines.sources import episodes  # the readers (TFDS, PyAV): the policy imports this module without

    spec = episodes.dataset_spec(data_dir, name)
    return tuple(spec.camera_key(name, c) for c in cameras)


def grid_shape(views: int) -> tuple[int, int]:
    """(rows, columns) of the tile grid of `views` cameras: as square as possible, rows filled first."""
    cols = math.ceil(math.sqrt(views))
    return math.ceil(views / cols), cols


def view_resolution(resolution: Sequence[int], views: int, layout: str) -> tuple[int, int]:
    """(H, W) each view is decoded at: one grid cell of `resolution` when tiled, `resolution` itself for tokens."""
    height, width = (int(r) for r in resolution)
    if layout != "tile" or views <= 1:
        return height, width
    rows, cols = grid_shape(views)
    if height % rows or width % cols:
        raise ValueError(
            f"data.resolution={(height, width)} does not split into the {rows}x{cols} grid of {views} tiled views; "
            f"use a multiple of ({rows}, {cols}) times the view size"
        )
    return height // rows, width // cols


def tile_views(views: np.ndarray) -> np.ndarray:
    """[..., V, h, w, C] -> [..., rows*h, cols*w, C]: views laid out row by row, empty cells zero (black)."""
    *lead, v, h, w, c = views.shape
    rows, cols = grid_shape(v)
    padded = np.zeros((*lead, rows * cols, h, w, c), views.dtype)
    padded[..., :v, :, :, :] = views
    grid = padded.reshape(*lead, rows, cols, h, w, c)
    grid = np.moveaxis(grid, -4, -3)  # [..., rows, h, cols, w, C]
    return grid.reshape(*lead, rows * h, cols * w, c)
