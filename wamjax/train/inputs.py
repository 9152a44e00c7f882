"""Host-side input: the configured data source per stage and its instruction embeddings."""

from __future__ import annotations

import grain
from absl import logging

from data_pipelines import pipeline as oxe_pipeline
from data_pipelines.clips import views
from data_pipelines.sources.latents import cache_norm_stats, make_latents_dataset
from data_pipelines.sources.synthetic import make_synthetic_dataset
from data_pipelines.sources.video import make_video_dataset
from wamjax.models.text import TextEmbedder
from wamjax.stages import StageSpec

__all__ = ["TextEmbedder", "make_stage_dataset"]


def make_stage_dataset(
    spec: StageSpec, process_index: int, process_count: int
) -> tuple[grain.IterDataset, dict]:
    """The stage's per-process batch dataset and the normalization stats it uses."""
    data, stage = spec.data, spec.name
    if data.latents_cache:
        logging.info("data: precomputed VAE latents from %s (data.latents_cache)", data.latents_cache)
        dataset = make_latents_dataset(
            data.latents_cache, data.batch_size, seed=data.seed, shuffle=data.shuffle,
            process_index=process_index, process_count=process_count, vae_config=spec.vae,
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
    video_weight = spec.video_weight
    if data.video_shards and video_weight > 0:
        if views.views_axis(data) is not None:
            raise ValueError(f"data.video_shards with data.view_layout='tokens' (cameras {views.camera_names(data)}) "
                             f"in stage {stage!r}: captioned videos have one camera; set its mixture weight to 0")

        logging.info("data: captioned-video shards %s mixed in with weight %s", data.video_shards, video_weight)
        extra.append((
            make_video_dataset(
                data.video_shards, num_frames=data.num_frames, resolution=tuple(data.resolution),
                proprio_dim=data.proprio_dim, action_dim=int(data.get("action_dim", 7)),
                dataset_index=len(oxe_pipeline.config_lib.dataset_names(data)),
                seed=data.seed, num_epochs=None, skip_bad_shards=data.skip_bad_records,
                num_actions=spec.clip.actions,
                num_states=spec.clip.states,
            ),
            video_weight,
        ))
    dataset = oxe_pipeline.make_dataset(
        data, process_index=process_index, process_count=process_count, stats=stats, extra_sources=extra
    )
    return dataset, stats
