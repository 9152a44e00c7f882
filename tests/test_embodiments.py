"""Each robot's own action space: a 14-D bimanual robot with relative joint targets and a 7-D end-effector robot in
one run, padded into model.action_dim with a per-dimension mask the loss respects, and a policy that returns each
its own raw actions."""

import os
import shutil

import numpy as np
import pytest
from train_utils import REPO, get_config

from data_pipelines import config as data_config_lib
from data_pipelines import make_lerobot, pipeline
from data_pipelines.clips import windowing
from data_pipelines.sources import lerobot
from data_pipelines.standardize import embodiments, registry
from data_pipelines.standardize import stats as stats_lib

FIXTURE = os.path.join(REPO, "tests", "fixtures", "lerobot", "v3_h264")
LAYOUT = embodiments.get_embodiment("bimanual_joints14_relative")


def _bimanual_episodes(count: int, seed: int = 0) -> list[dict]:
    """Two arms tracking smooth joint targets; the state follows the previous step's target."""
    rng = np.random.default_rng(seed)
    scene = make_lerobot.synthetic_episodes(count, seed=seed, image_size=(24, 32), min_steps=20, max_steps=28)
    for episode in scene:
        length = len(episode["action"])
        phase = rng.uniform(0, 2 * np.pi, 14)
        targets = 0.5 * np.sin(np.linspace(0, 3, length)[:, None] + phase).astype(np.float32)
        targets[:, [6, 13]] = (np.arange(length)[:, None] > length // 2).astype(np.float32)  # grippers close
        state = np.concatenate([np.zeros((1, 14), np.float32), targets[:-1]]) + 1.0  # offset: relative matters
        episode["action"], episode["state"] = targets + 1.0, state
    return scene


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("embodiments")
    make_lerobot.write_dataset(str(root / "bimanual"), _bimanual_episodes(6), robot_type="bimanual_arm",
                               action_names=LAYOUT.action_names, state_names=LAYOUT.action_names)
    shutil.copytree(FIXTURE, root / "fixture")
    registry.register_dataset("lerobot:robot_type=bimanual_arm", registry.DatasetSpec(
        primary_camera="observation.images.image", wrist_camera="observation.images.wrist_image",
        cameras=tuple(make_lerobot.CAMERAS), action=lambda s: s["action"], proprio=lambda s: s["observation.state"],
        instruction=lambda s: s["task"], embodiment=LAYOUT.name,
    ), overwrite=True)
    stats = stats_lib.compute_stats(str(root), ["lerobot:bimanual", "lerobot:fixture"], proprio_dim=14,
                                    relative_horizon=4)
    stats_lib.save_stats(stats, str(root / "stats.json"))
    return root


def test_stats_are_per_embodiment_and_relative_where_it_says(data_dir):
    stats = stats_lib.load_stats(str(data_dir / "stats.json"))["datasets"]
    bimanual, eef = stats["lerobot:bimanual"], stats["lerobot:fixture"]
    assert (bimanual["embodiment"], eef["embodiment"]) == ("bimanual_joints14_relative", "eef7")
    assert len(bimanual["action"]["mean"]) == 14 and len(eef["action"]["mean"]) == 7
    assert bimanual["action"]["mask"] == [d not in (6, 13) for d in range(14)]
    # Relative joint targets: the +1 offset of targets and states cancels; the grippers stay absolute.
    source = lerobot.LeRobotSource(str(data_dir), "lerobot:bimanual")
    want = np.concatenate([LAYOUT.statistics_samples(source[i].actions, source[i].proprio, 4) for i in range(6)])
    np.testing.assert_allclose(bimanual["action"]["mean"], want.mean(0), rtol=1e-5, atol=1e-6)
    assert abs(bimanual["action"]["mean"][0]) < 0.5 < bimanual["action"]["mean"][6] + 1.0


def _config(data_dir, **overrides):
    config = data_config_lib.get_data_config()
    config.update(data_dir=str(data_dir), datasets="lerobot:bimanual,lerobot:fixture", batch_size=8, num_frames=5,
                  stats_path=str(data_dir / "stats.json"), action_dim=14, proprio_dim=14, clips_per_episode=2)
    config.update(overrides)
    return config


def test_clips_pad_each_embodiment_and_mask_its_dimensions(data_dir):
    batch = next(pipeline.make_iterator(_config(data_dir)))
    assert batch["actions"].shape == (8, 4, 14) and batch["action_dim_mask"].shape == (8, 14)
    for row in range(8):
        own = 14 if batch["dataset_index"][row] == 0 else 7
        np.testing.assert_array_equal(batch["action_dim_mask"][row], np.arange(14) < own)
        assert not batch["actions"][row][:, own:].any()
    assert set(batch["dataset_index"].tolist()) == {0, 1}


def test_relative_clip_actions_are_measured_from_the_chunk_start(data_dir):
    stats = stats_lib.load_stats(str(data_dir / "stats.json"))["datasets"]["lerobot:bimanual"]
    episode = lerobot.LeRobotSource(str(data_dir), "lerobot:bimanual")[2]
    clip = windowing.make_clip(episode, 3, num_frames=5, frame_stride=1, resolution=(8, 8), dataset_stats=stats,
                               proprio_dim=14, action_normalization="normal", dataset_index=0, wrist_camera=False,
                               action_dim=14, embodiment=LAYOUT, frame_decoder=lambda s: np.zeros((8, 8, 3), np.uint8))
    raw = stats_lib.unnormalize(clip["actions"], stats["action"], "normal")
    # Absolute target targets[3 + j] = relative + state at the clip's first frame (step 3).
    np.testing.assert_allclose(LAYOUT.to_absolute(raw, episode.proprio[3]), episode.actions[3:7], atol=1e-5)


def test_the_loss_counts_only_an_embodiments_own_dimensions():
    import jax
    import jax.numpy as jnp

    from wamjax.models.config import model_config_from_run
    from wamjax.models.wam import init_params
    from wamjax.train.step import StepSpec, compute_loss, example_rngs

    config = get_config("size=tiny,stage=action_tune")
    config.model.action_dim = 14
    assert config.data.action_dim == 14  # the data's width follows the model's
    cfg = model_config_from_run(config)
    frames, num_actions = 3, 8
    params = jax.jit(init_params, static_argnums=(0, 2, 3, 4))(cfg, jax.random.key(0), (frames, 4, 4, 16), 8, 8)
    spec = StepSpec(model=cfg, mode="joint", clean_context_frames=1, vae=None)
    loss_fn = jax.jit(lambda p, x0, batch, rng: compute_loss(spec, config.diffusion, p, x0, batch, rng)[1])
    r = np.random.default_rng(0)
    actions = r.standard_normal((2, num_actions, 14)).astype(np.float32)
    batch = {"actions": jnp.asarray(actions), "action_mask": jnp.ones((2, num_actions), bool),
             "has_actions": jnp.ones(2, bool), "proprio": jnp.zeros((2, cfg.proprio_dim), jnp.float32),
             "text_embeddings": jnp.asarray(r.standard_normal((2, 8, cfg.text_dim)), jnp.float32),
             "action_dim_mask": jnp.asarray(np.arange(14)[None].repeat(2, 0) < 7)}
    x0 = jnp.asarray(r.standard_normal((2, frames, 4, 4, 16)), jnp.float32)
    rng = example_rngs(jax.random.key(7), 2)
    part = loss_fn(params, x0, batch, rng)["loss_action"]
    full = loss_fn(params, x0, {k: v for k, v in batch.items() if k != "action_dim_mask"}, rng)["loss_action"]
    assert np.isfinite(float(part)) and abs(float(part) - float(full)) > 1e-4
    every = loss_fn(params, x0, dict(batch, action_dim_mask=jnp.ones((2, 14), bool)), rng)["loss_action"]
    assert float(every) == pytest.approx(float(full), rel=1e-6)


@pytest.fixture(scope="module")
def two_robot_run(data_dir, tmp_path_factory):
    from wamjax.train.loop import train

    config = get_config("size=tiny,stage=action_tune,data=oxe")
    config.model.action_dim = 14
    config.data.update(data_dir=str(data_dir), datasets="lerobot:bimanual,lerobot:fixture", proprio_dim=14,
                       stats_path=str(data_dir / "stats.json"), num_frames=5)
    config.train.steps, config.train.log_every, config.checkpoint.every_steps = 3, 1, 3
    config.checkpoint.async_save = False
    workdir = tmp_path_factory.mktemp("two_robots")
    train(config, str(workdir))
    return str(workdir / "checkpoints")


def test_a_run_over_both_robots_acts_in_each_robots_own_space(two_robot_run):
    from wamjax.inference.policy import Policy

    frame = np.zeros((32, 32, 3), np.uint8)
    state = np.ones(14, np.float32)
    bimanual = Policy.from_checkpoint(two_robot_run, num_steps=2, dataset="lerobot:bimanual")
    chunk = bimanual.infer(frame, state, "pick up the red cube")["actions"]
    assert chunk.shape == (4, 14) and np.all(np.isfinite(chunk))
    assert bimanual.metadata["embodiment"] == "bimanual_joints14_relative"
    assert bimanual.metadata["action_dim"] == 14 and bimanual.metadata["model_action_dim"] == 14
    # Relative joint targets come back absolute: the same model output from another state moves with it.
    model_out = np.zeros((4, 14), np.float32)
    np.testing.assert_allclose(bimanual.actions_from_model(model_out, state + 2.0)[:, :6],
                               bimanual.actions_from_model(model_out, state)[:, :6] + 2.0, atol=1e-5)
    np.testing.assert_allclose(bimanual.actions_from_model(bimanual.actions_to_model(chunk, state), state), chunk,
                               atol=1e-4)
    with pytest.raises(ValueError, match="acts relative to the current state: send the observation's proprio"):
        bimanual.infer(frame, None, "pick up the red cube")
    eef = Policy.from_checkpoint(two_robot_run, num_steps=2, dataset="lerobot:fixture")
    chunk = eef.infer(frame, state[:8], "open the drawer")["actions"]
    assert chunk.shape == (4, 7) and eef.metadata["embodiment"] == "eef7" and eef.metadata["action_dim"] == 7
    assert bimanual.for_dataset("lerobot:fixture").metadata["action_dim"] == 7
    with pytest.raises(KeyError, match="dataset='lerobot:nope' has no normalization stats"):
        bimanual.for_dataset("lerobot:nope")


def test_one_server_acts_for_each_robot_its_request_names(two_robot_run):
    from wamjax.inference.policy import Policy
    from wamjax.serving.client import PolicyClient, ServerError
    from wamjax.serving.serve import PolicyServer

    policy = Policy.from_checkpoint(two_robot_run, num_steps=1, dataset="lerobot:bimanual")
    server = PolicyServer(policy, port=0)
    server.start_in_thread()
    try:
        client = PolicyClient(f"ws://127.0.0.1:{server.port}")
        meta = client.metadata
        assert meta["datasets"] == {"lerobot:bimanual": {"embodiment": "bimanual_joints14_relative", "action_dim": 14},
                                    "lerobot:fixture": {"embodiment": "eef7", "action_dim": 7}}
        observation = {"observation/image": np.zeros((32, 32, 3), np.uint8), "prompt": "open the drawer",
                       "observation/state": np.ones(14, np.float32)}
        assert client.infer(observation)["actions"].shape == (4, 14)  # the server's --dataset
        reply = client.infer({**observation, "dataset": "lerobot:fixture", "observation/state": np.ones(8, np.float32)})
        assert reply["actions"].shape == (4, 7)
        with pytest.raises(ServerError, match="dataset='lerobot:other' has no normalization stats"):
            client.infer({**observation, "dataset": "lerobot:other"})
        client.close()
    finally:
        server.stop()
