"""Runs on real data keep their normalization stats: from RLDS and from a latents cache, through the checkpoint to
the policy, the server, evaluation and export; a checkpoint without them is refused, never used unnormalized.

The trained policies must act in the dataset's raw units: their first chunk on the training episodes beats a
constant mean action by a wide margin (MAE at most `MARGIN` of the mean action's). A checkpoint that lost its
stats (the bug this guards against) scored 1.7-1.9x the mean action's error on the issue's repro.
"""

import json
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
from train_utils import get_config, openpi_client_python

from data_pipelines.sources.latents import META_NAME
from data_pipelines.standardize import stats as stats_lib
from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import resolve_step_dir
from wamjax.checkpoint.norm_stats import (
    MissingNormStatsError,
    checked_norm_stats,
    trained_on_synthetic_data,
)
from wamjax.eval import action_error
from wamjax.jobs.collect_sim import collect_metaworld
from wamjax.jobs.encode_latents import encode_batches, encode_run_cache

TASK = "reach-v3"
EPISODES = 4
MARGIN = 0.6  # the policy's first-chunk MAE must be at most this share of the constant mean action's


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("norm_stats")
    data_dir = str(root / "data")
    collect_metaworld(data_dir, [TASK], EPISODES, resolution=(32, 32))
    stats = stats_lib.compute_stats(data_dir, ["metaworld"])
    stats_path = str(root / "stats.json")
    stats_lib.save_stats(stats, stats_path)
    return root, data_dir, stats_path


def run_config(data_dir: str, stats_path: str, steps: int):
    config = get_config("size=tiny,stage=action_tune,data=oxe")
    config.data.data_dir, config.data.datasets, config.data.stats_path = data_dir, "metaworld", stats_path
    config.train.steps, config.train.log_every, config.checkpoint.every_steps = steps, 100, steps
    config.checkpoint.async_save = False
    return config


@pytest.fixture(scope="module")
def cache_run(data):
    from wamjax.train.loop import train

    root, data_dir, stats_path = data
    config = run_config(data_dir, stats_path, 300)
    encode_run_cache(config, str(root / "latents"), num_batches=16)
    config.data.latents_cache = str(root / "latents")
    workdir = str(root / "cache_run")
    train(config, workdir)
    return workdir + "/checkpoints"


def policy_error(checkpoint: str) -> dict:
    from wamjax.inference.policy import Policy
    from wamjax.stages import policy_spec

    policy = Policy.from_checkpoint(checkpoint, num_steps=4, dataset="metaworld")
    return action_error.policy_action_error(policy, policy_spec(policy.run_config).data, "metaworld",
                                            max_episodes=EPISODES, windows_per_episode=4, ablations=("camera",))


def test_the_one_decision_synthetic_or_stats():
    synthetic = get_config("size=tiny,stage=action_tune")
    real = get_config("size=tiny,stage=action_tune,data=oxe")
    assert trained_on_synthetic_data(synthetic) and not trained_on_synthetic_data(real)
    assert checked_norm_stats(synthetic, {}, where="x") == {}
    stats = {"datasets": {"metaworld": {}}}
    assert checked_norm_stats(real, stats, where="x") == stats
    real.data.latents_cache = "LAT"
    with pytest.raises(MissingNormStatsError, match=r"checkpoint C has no normalization stats .*'norm_stats'.*"
                                                    r"data.source='oxe', data.latents_cache='LAT'"):
        checked_norm_stats(real, {}, where="checkpoint C")


def test_a_latents_cache_run_carries_its_stats_and_acts_in_raw_units(data, cache_run, tmp_path):
    _, _, stats_path = data
    step_dir = resolve_step_dir(cache_run)
    assert ckpt.read_json_item(step_dir, "norm_stats") == stats_lib.load_stats(stats_path)
    result = policy_error(cache_run)
    mae, base = result["mae"]["camera"], result["mae"]["mean_action"]
    assert result["windows"] >= 2 * EPISODES and result["dims"] == [0, 1, 2]
    assert mae < MARGIN * base, result

    # The same checkpoint with its stats item emptied is refused by every consumer, naming it.
    broken = tmp_path / "broken" / step_dir.name
    shutil.copytree(step_dir, broken)
    (broken / "norm_stats" / "metadata").write_text("{}")
    from wamjax.eval.agents import stats_dataset
    from wamjax.eval.offline import evaluate_checkpoint
    from wamjax.export.to_torch import export_checkpoint
    from wamjax.inference.policy import Policy

    expected = rf"checkpoint {broken}.* has no normalization stats"
    with pytest.raises(MissingNormStatsError, match=expected):
        Policy.from_checkpoint(str(broken))
    with pytest.raises(MissingNormStatsError, match=expected):
        stats_dataset(str(broken), "metaworld")
    with pytest.raises(MissingNormStatsError, match=expected):
        evaluate_checkpoint(str(broken), out=str(tmp_path / "eval"))
    with pytest.raises(MissingNormStatsError, match=expected):
        export_checkpoint(str(broken), str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()  # refused before anything is written


def test_a_latents_cache_refuses_other_stats_or_layout_naming_both(data, cache_run, tmp_path):
    from wamjax.stages import stage_spec
    from wamjax.train.inputs import make_stage_dataset

    root, data_dir, stats_path = data
    config = run_config(data_dir, stats_path, 1)
    config.data.latents_cache = str(root / "latents")
    other = stats_lib.load_stats(stats_path)
    other["datasets"]["metaworld"]["action"]["mean"][0] += 1.0
    other_path = str(tmp_path / "other_stats.json")
    stats_lib.save_stats(other, other_path)
    config.data.stats_path = other_path
    with pytest.raises(ValueError, match=rf"normalized with the stats of {stats_path}.*{other_path} holds different"):
        make_stage_dataset(stage_spec(config, "action_tune"), 0, 1)
    config.data.stats_path = ""  # the cache's own stats are taken
    _, stats = make_stage_dataset(stage_spec(config, "action_tune"), 0, 1)
    assert stats == stats_lib.load_stats(stats_path)
    config.data.resolution = (64, 64)
    with pytest.raises(ValueError, match=r"data.resolution: cache \[32, 32\], run \[64, 64\]"):
        make_stage_dataset(stage_spec(config, "action_tune"), 0, 1)
    config.data.resolution = (32, 32)
    config.data.source = "synthetic"
    with pytest.raises(ValueError, match=r"data.source: cache 'oxe', run 'synthetic'"):
        make_stage_dataset(stage_spec(config, "action_tune"), 0, 1)
    meta = json.loads((root / "latents" / META_NAME).read_text())
    assert meta["stats_path"] == stats_path and meta["data"]["datasets"] == ["metaworld"]


CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from openpi_client import websocket_client_policy

    port, path = int(sys.argv[1]), sys.argv[2]
    windows = np.load(path)
    policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    chunks = [policy.infer({"observation/image": image, "observation/state": state, "prompt": prompt})["actions"]
              for image, state, prompt in zip(windows["images"], windows["states"], windows["prompts"])]
    np.save(path.replace(".npz", "_actions.npy"), np.stack(chunks))
""")


def test_the_server_acts_in_raw_units_through_the_real_openpi_client(cache_run, tmp_path):
    from wamjax.inference.policy import Policy
    from wamjax.serving.serve import PolicyServer
    from wamjax.stages import policy_spec

    python = openpi_client_python()
    policy = Policy.from_checkpoint(cache_run, num_steps=4, dataset="metaworld")
    data = policy_spec(policy.run_config).data
    windows = action_error.action_windows(data, "metaworld", policy.stats, max_episodes=EPISODES,
                                                           windows_per_episode=4)
    path = str(tmp_path / "windows.npz")
    np.savez(path, images=np.stack([w["frames"][0] for w in windows]),
             states=np.stack([w["proprio"] for w in windows]), prompts=np.array([w["instruction"] for w in windows]))
    (tmp_path / "client.py").write_text(CLIENT_SCRIPT)
    server = PolicyServer(policy, port=0)
    port = server.start_in_thread()
    try:
        result = subprocess.run([python, str(tmp_path / "client.py"), str(port), path], capture_output=True,
                                text=True, timeout=300)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(str(tmp_path / "windows_actions.npy"))
    dims = action_error.mean_action_dims(policy.stats)
    mae = action_error.chunk_errors(list(served), windows, dims).mean()
    base = action_error.mean_action_errors(policy.stats, windows).mean()
    assert mae < MARGIN * base, (mae, base)


def test_an_rlds_run_carries_its_stats_and_acts_in_raw_units(data):
    from wamjax.train.loop import train

    root, data_dir, stats_path = data
    workdir = str(root / "rlds_run")
    train(run_config(data_dir, stats_path, 200), workdir)
    assert ckpt.read_json_item(resolve_step_dir(workdir + "/checkpoints"), "norm_stats") == stats_lib.load_stats(
        stats_path)
    result = policy_error(workdir + "/checkpoints")
    print("rlds run:", action_error.format_action_error(result))
    assert result["mae"]["camera"] < MARGIN * result["mae"]["mean_action"], result


def test_a_run_on_real_data_without_stats_does_not_start(data, tmp_path):
    """A cache of real data written without its stats (a library caller leaving them out) cannot train."""
    from data_pipelines.sources.latents import data_layout
    from wamjax.checkpoint.wan_vae_import import load_vae
    from wamjax.jobs.encode_latents import _config_batches
    from wamjax.train.loop import train

    root, data_dir, stats_path = data
    config = run_config(data_dir, "", 1)
    config.data.stats_path = stats_path
    vae_config, params = load_vae(config.vae.size, config.vae.weights, config.vae.seed)
    batches, _ = _config_batches(config.data)
    encode_batches(batches, vae_config, params, str(tmp_path / "latents"), num_batches=1,
                   metadata={"data": data_layout(config.data)})
    config.data.stats_path, config.data.latents_cache = "", str(tmp_path / "latents")
    with pytest.raises(MissingNormStatsError, match=r"stage 'action_tune''s data has no normalization stats"):
        train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
