"""Host-side input: the configured data source per stage and its instruction embeddings."""

from __future__ import annotations

import copy

import grain
import ml_collections
from absl import logging

from data_pipelines import pipeline as oxe_pipeline
from data_pipelines.clips import views
from data_pipelines.config import clip_num_actions, clip_num_states  # noqa: F401  (re-exported)
from data_pipelines.sources.latents import cache_norm_stats, make_latents_dataset
from data_pipelines.sources.synthetic import make_synthetic_dataset
from wamjax.models.text import TextEmbedder

__all__ = ["TextEmbedder", "make_stage_dataset", "stage_data_config"]


def stage_data_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """config.data with the stage's dataset, camera and latents-cache overrides applied."""
    data = copy.deepcopy(config.data)
    stage_cfg = config.stages[stage]
    with data.unlocked():
        if stage_cfg.datasets:
            data.datasets = stage_cfg.datasets
            data.weights = tuple(stage_cfg.weights)
        if stage_cfg.get("cameras"):
            data.cameras = stage_cfg.cameras
        if stage_cfg.get("latents_cache"):
            data.latents_cache = stage_cfg.latents_cache
            data.latents_cache_weights = tuple(stage_cfg.get("latents_cache_weights", ()) or ())
    return data


def stage_video_weight(config: ml_collections.ConfigDict, stage: str) -> float:
    """Mixture weight of the captioned-video shards in `stage`: data.video_weight in video stages,
    data.action_stage_video_weight in joint stages (video-only examples with the action loss masked)."""
    if config.stages[stage].mode == "video":
        return float(config.data.video_weight)
    return float(config.data.get("action_stage_video_weight", 0.0))


def make_stage_dataset(
    config: ml_collections.ConfigDict, stage: str, process_index: int, process_count: int
) -> tuple[grain.IterDataset, dict]:
    """The stage's per-process batch dataset and the normalization stats it uses."""
    data = stage_data_config(config, stage)
    if data.latents_cache:
        from wamjax.models.vae import vae_config_for

        logging.info("data: precomputed VAE latents from %s (data.latents_cache)", data.latents_cache)
        dataset = make_latents_dataset(
            data.latents_cache, data.batch_size, seed=data.seed, shuffle=data.shuffle,
            process_index=process_index, process_count=process_count, vae_config=vae_config_for(config.vae.size),
            data_config=data,
        )
        return dataset, cache_norm_stats(data.latents_cache, data)
    if data.source == "synthetic":
        logging.info("data: SYNTHETIC clips (data.source=synthetic); not a real dataset")
        return make_synthetic_dataset(data, process_index=process_index, process_count=process_count), {}
    if data.source != "oxe":
        raise ValueError(f"data.source={data.source!r}; expected 'synthetic' or 'oxe'")
    stats = oxe_pipeline.resolve_stats(data)
    extra = []
    video_weight = stage_video_weight(config, stage)
    if data.video_shards and video_weight > 0:
        if views.views_axis(data) is not None:
            raise ValueError(f"data.video_shards with data.view_layout='tokens' (cameras {views.camera_names(data)}) "
                             f"in stage {stage!r}: captioned videos have one camera; set its mixture weight to 0")
        from data_pipelines.sources.video import make_video_dataset

        logging.info("data: captioned-video shards %s mixed in with weight %s", data.video_shards, video_weight)
        extra.append((
            make_video_dataset(
                data.video_shards, num_frames=data.num_frames, resolution=tuple(data.resolution),
                proprio_dim=data.proprio_dim, dataset_index=len(oxe_pipeline.config_lib.dataset_names(data)),
                seed=data.seed, num_epochs=None, skip_bad_shards=data.skip_bad_records,
                num_actions=clip_num_actions(config),
                num_states=clip_num_states(data),
            ),
            video_weight,
        ))
    dataset = oxe_pipeline.make_dataset(
        data, process_index=process_index, process_count=process_count, stats=stats, extra_sources=extra
    )
    return dataset, stats
