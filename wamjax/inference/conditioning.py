"""Inference inputs built as the trainer builds them: several cameras into one frame (tile) or a views axis
(tokens), and Wan2.1-I2V's first-frame latents and CLIP tokens."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from data_pipelines.clips import views
from wamjax.checkpoint import clip_import
from wamjax.models import clip
from wamjax.models import vae as vae_lib
from wamjax.models.encoders import encode_first_frames, encode_views
from wamjax.models.wam import first_frame_video
from wamjax.stages import PolicySpec

Params = Any


def load_image_encoder(
    run_config: ml_collections.ConfigDict, spec: PolicySpec
) -> tuple[clip.CLIPVisionConfig | None, Params | None]:
    """The frozen CLIP tower the run trained with (its weights from `image.*` of the run config), or (None, None)
    for a text-to-video model."""
    if spec.image_encoder is None:
        return None, None
    return spec.image_encoder, jax.tree.map(jnp.asarray, clip_import.encoder_params(run_config, spec.image_encoder))


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def i2v_conditioning(
    vae_config: Any, vae_params: Params, image_config: clip.CLIPVisionConfig, image_params: Params,
    first_frames: jax.Array, num_frames: int,
) -> tuple[jax.Array, jax.Array]:
    """uint8 first frames [B, H, W, 3] -> (normalized VAE latents of the frame followed by `num_frames - 1` zero
    frames [B, F, h, w, z], CLIP tokens [B, tokens, image_dim]): the trainer's conditioning of a clip. Several
    views [B, V, H, W, 3] give [B, F, V, h, w, z] and [B, V * tokens, image_dim], as the trainer's."""
    video = vae_lib.frames_to_video(first_frames)[:, None]
    video = jnp.concatenate([video, jnp.zeros((video.shape[0], num_frames - 1, *video.shape[2:]), video.dtype)], 1)
    latents = encode_views(vae_config, vae_params, first_frame_video(video))
    condition = vae_lib.normalize_latents(vae_config, latents)
    return condition, encode_first_frames(image_config, image_params, first_frames)


def combine_cameras(
    images: np.ndarray | Sequence[np.ndarray], spec: PolicySpec, resize: Any,
) -> np.ndarray:
    """The cameras of one observation as the model's frames [T, H, W, 3] (or [H, W, 3]) at `data.resolution`;
    for the tokens view layout, [T, V, H, W, 3] (or [V, H, W, 3]), each view resized to `data.resolution`.

    `images` is one array per camera (a list, in `data.cameras` order, each [H, W, 3] or [T, H, W, 3]) or an array
    with a views axis [V, H, W, 3] / [T, V, H, W, 3]; a single-camera model also takes its one array as is.
    Several cameras are resized to one grid cell each and tiled (`data.view_layout=tile`), as in training, or
    each to the whole resolution and stacked along a views axis (`tokens`).
    `resize(frames [T, H, W, 3], (h, w))` is the resize the policy uses.
    """
    data = spec.data
    expected = views.num_views(data)
    names = views.camera_names(data) or ["primary"]
    if isinstance(images, (list, tuple)):
        per_camera = [np.asarray(i) for i in images]
    elif expected == 1:
        if views.views_axis(data) is None:
            return np.asarray(images)
        per_camera = [np.asarray(images)]  # one camera on a views axis of length 1
    else:
        images = np.asarray(images)
        if images.ndim not in (4, 5) or images.shape[-4] != expected:
            raise ValueError(f"images have shape {images.shape}; this policy reads {expected} cameras {names}: "
                             f"pass a list of {expected} arrays or an array [{expected}, H, W, 3] / "
                             f"[T, {expected}, H, W, 3]")
        per_camera = [images[..., v, :, :, :] for v in range(expected)]
    if len(per_camera) != expected:
        raise ValueError(f"{len(per_camera)} camera images; this policy reads {expected} cameras {names} "
                         "(data.cameras of its run), in that order")
    layout = views.view_layout(data)
    if expected == 1 and views.views_axis(data) is None:
        return per_camera[0]
    shapes = {i.shape[:-3] for i in per_camera}
    for name, image in zip(names, per_camera, strict=True):
        if image.ndim not in (3, 4) or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"camera {name!r}: image has shape {image.shape} and dtype {image.dtype}; expected "
                             "uint8 [H, W, 3] or [T, H, W, 3]")
    if len(shapes) != 1:
        raise ValueError(f"camera images disagree on their number of frames: {[i.shape for i in per_camera]}")
    cell = views.view_resolution(data.resolution, expected, layout)
    resized = np.stack([resize(i if i.ndim == 4 else i[None], cell) for i in per_camera], axis=1)
    combined = views.tile_views(resized) if layout == "tile" else resized
    return combined if per_camera[0].ndim == 4 else combined[0]


def resize_frames(frames: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, h, w, 3] with the bilinear PIL resize the data pipeline uses."""
    h, w = resolution
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames])
