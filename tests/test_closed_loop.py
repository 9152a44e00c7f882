"""Meta-World: expert episodes -> TFDS dataset -> pipeline, stats, trainer -> closed-loop evaluation CLI.

MuJoCo's CPU renderer cannot share a process with TensorFlow (which TFDS loads here), so everything that
renders runs in its own process: the collector's spawned simulator and the closed-loop CLI.
"""

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds
from train_utils import REPO, get_config, subprocess_env

from data_pipelines.pipeline import make_dataset
from data_pipelines.sources.rlds import EpisodeSource
from data_pipelines.standardize import registry
from data_pipelines.standardize import stats as stats_lib
from wamjax.jobs.collect_sim import collect_metaworld
from wamjax.sim import metaworld_env

TASK = "reach-v3"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("metaworld_data"))
    collect_metaworld(out, [TASK], 2, resolution=(32, 32))
    return out


def closed_loop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wamjax.eval.closed_loop", f"--tasks={TASK}", "--resolution=32,32",
                           *args], env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=600)


def test_metaworld_action_maps_to_standard_and_back():
    env_actions = np.array([[0.1, -0.5, 1.0, -1.0], [0.0, 0.2, -0.3, 1.0], [0.3, 0.0, 0.0, 0.0]], np.float32)
    standard = registry.metaworld_action_to_standard(env_actions)
    np.testing.assert_allclose(standard[:, 6], [1.0, 0.0, 0.5])  # gripper openness: -1 (open) -> 1
    np.testing.assert_array_equal(standard[:, 3:6], 0.0)
    np.testing.assert_allclose(metaworld_env.env_action(standard), env_actions, atol=1e-6)
    np.testing.assert_array_equal(metaworld_env.env_action(np.array([5, -5, 0, 0, 0, 0, 2.0])), [1, -1, 0, -1])
    with pytest.raises(ValueError, match="4 values"):
        registry.metaworld_action_to_standard(np.zeros(7))


def test_expert_episodes_read_back_through_registry_stats_and_pipeline(dataset_dir):
    source = EpisodeSource(dataset_dir, "metaworld")
    assert len(source) == 2
    raw = tfds.builder_from_directory(source.dataset_dir).as_data_source()["train"]
    for index in range(2):
        episode, record = source[index], raw[index]
        assert record["episode_metadata"]["success"] and record["episode_metadata"]["task"] == TASK.encode()
        steps = {key: np.stack([step[key] for step in record["steps"]]) for key in ("is_first", "is_last",
                 "is_terminal", "success", "action")}
        steps["observation"] = {key: np.stack([step["observation"][key] for step in record["steps"]])
                                for key in ("state", "full_state")}
        assert steps["is_first"][0] and steps["is_last"][-1] and steps["is_terminal"][-1]
        assert not steps["is_last"][:-1].any() and steps["success"][-2]
        assert 10 < len(episode) < 200  # the expert reaches in ~50 steps
        assert episode.instruction == metaworld_env.instruction(TASK) == "reach the red goal"
        np.testing.assert_allclose(metaworld_env.env_action(episode.actions), steps["action"], atol=1e-6)
        np.testing.assert_array_equal(episode.proprio, steps["observation"]["state"])
        np.testing.assert_array_equal(steps["observation"]["state"], steps["observation"]["full_state"][:, :4])
        frame = episode.decode_frame(0, (32, 32))
        wrist = episode.decode_frame(0, (32, 32), wrist=True)
        assert frame.shape == wrist.shape == (32, 32, 3) and frame.std() > 10 and not np.array_equal(frame, wrist)
        # The right way up: the grey wall at the top left, the wooden table top (brown: red over blue) below it.
        wall, table = frame[:6, :10].reshape(-1, 3).mean(0), frame[-10:, :10].reshape(-1, 3).mean(0)
        assert abs(wall[0] - wall[2]) < 10 and wall.mean() > 100 and table[0] - table[2] > 12
    # The end effector moves: frames and proprio change over an episode.
    assert np.abs(source[0].proprio[-1, :3] - source[0].proprio[0, :3]).max() > 0.05
    assert np.abs(source[0].decode_frame(-1, None).astype(int) - source[0].decode_frame(0, None)).mean() > 1

    stats = stats_lib.compute_stats(dataset_dir, ["metaworld"])
    entry = stats["datasets"]["metaworld"]
    assert entry["action"]["mask"] == [True] * 3 + [False] * 4
    assert entry["proprio"]["mask"] == [True] * 3 + [False] * 5  # gripper and padding left alone

    config = get_config("size=tiny,stage=action_tune,data=oxe").data
    config.data_dir, config.datasets = dataset_dir, "metaworld"
    batch = next(iter(make_dataset(config, stats=stats)))
    assert batch["frames"].shape == (8, 9, 32, 32, 3) and batch["actions"].shape == (8, 8, 7)
    assert set(batch["instruction"]) == {"reach the red goal"}
    assert np.abs(batch["actions"][..., :3]).max() > 0.1 and np.all(batch["actions"][..., 3:6] == 0)


def test_closed_loop_in_the_training_loop_and_the_cli(dataset_dir, tmp_path):
    import tensorflow  # noqa: F401  (as in a trainer reading TFDS data: the simulator must live elsewhere)

    from wamjax.eval.agents import ExpertAgent, ReplayAgent
    from wamjax.eval.closed_loop_hook import LoopClosedLoop
    from wamjax.eval.hooks import loop_hooks
    from wamjax.eval.rollout import evaluate
    from wamjax.eval.sim_process import SpawnedTask
    from wamjax.train.loop import train

    # The spawned simulator is the same environment: the expert succeeds through it.
    summary = evaluate(ExpertAgent(), [TASK], 1, resolution=(32, 32), make_env=SpawnedTask, log=lambda _: None)
    assert summary["tasks"][TASK]["success_rate"] == 1.0
    # The blind baseline replays the expert's actions of collection variant 0: on that variant it succeeds too.
    replay = ReplayAgent()
    summary = evaluate(replay, [TASK], 1, seed=0, resolution=(32, 32), make_env=SpawnedTask, log=lambda _: None)
    assert summary["tasks"][TASK]["success_rate"] == 1.0 and len(replay.recorded[TASK]) < 150

    config = get_config("size=tiny,stage=action_tune,data=oxe")
    config.train.steps = 2
    config.checkpoint.async_save = False
    config.data.batch_size = 8
    config.data.data_dir, config.data.datasets = dataset_dir, "metaworld"
    ev = config.eval
    ev.closed_loop_every_steps, ev.closed_loop_tasks, ev.closed_loop_episodes = 2, TASK, 1
    ev.closed_loop_max_steps, ev.closed_loop_resolution, ev.closed_loop_num_steps = 6, (32, 32), 1
    workdir = str(tmp_path / "run")
    train(config, workdir, hooks=loop_hooks())
    with open(f"{workdir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if '"closed_loop"' in line]
    assert [r["step"] for r in rows] == [2]
    for row in rows:
        assert row["stage"] == "action_tune" and 0.0 <= row[f"closed_loop/{TASK}/success_rate"] <= 1.0
        assert row[f"closed_loop/{TASK}/mean_steps"] <= 6 and row["closed_loop/overall/mean_return"] > 0
        out = tmp_path / "run" / "closed_loop" / f"step_{row['step']}"
        episode = json.loads((out / "summary.json").read_text())["tasks"][TASK]["episode_results"][0]
        with av.open(str(out / episode["video"])) as container:
            assert sum(1 for _ in container.decode(video=0)) == episode["steps"] + 1
    assert LoopClosedLoop.maybe(config, "video_pretrain", "video", None, None, workdir) is None
    ev.closed_loop_tasks = "reach-v3,reach-v9"
    with pytest.raises(ValueError, match=r"eval.closed_loop_tasks='reach-v3,reach-v9'.*reach-v9"):
        LoopClosedLoop.maybe(config, "action_tune", "joint", None, None, workdir)

    # The CLI on the run's checkpoint.

    out = tmp_path / "eval"
    run = closed_loop(f"--checkpoint={workdir}/checkpoints", "--episodes=2", "--max_steps=12", "--num_steps=1",
                      f"--out={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{TASK} episode 2/2 (variant 1 of seed 1000)" in run.stdout and "wam (joint, infer)" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["tasks"][TASK]
    assert entry["episodes"] == 2 and 0.0 <= entry["success_rate"] <= 1.0 and entry["mean_return"] > 0
    assert summary["config"]["seed"] == 1000 and summary["overall"]["episodes"] == 2
    for result in entry["episode_results"]:
        steps = result["steps"]
        assert steps == 12 or result["success"]
        with av.open(str(out / result["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == steps + 1 and frames[0].shape == (32, 32, 3)
        assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 0.5  # the arm moved

    # The same loop through the websocket server (openpi protocol), one request per chunk.
    run = closed_loop(f"--checkpoint={workdir}/checkpoints", "--through_server", "--episodes=1", "--max_steps=8",
                      "--num_steps=1", f"--out={tmp_path / 'served'}")
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert served["config"]["policy"] == "wam (server)" and served["tasks"][TASK]["episodes"] == 1
    assert (tmp_path / "served" / served["tasks"][TASK]["episode_results"][0]["video"]).is_file()

    run = closed_loop("--policy=expert", "--episodes=2", f"--out={tmp_path / 'expert'}")
    assert run.returncode == 0, run.stderr[-3000:]
    expert = json.loads((tmp_path / "expert" / "summary.json").read_text())["tasks"][TASK]
    assert expert["success_rate"] == 1.0 and expert["mean_steps_to_success"] < 150


def test_bad_tasks_and_a_renderer_beside_tensorflow_are_named():
    with pytest.raises(ValueError, match=r"unknown Meta-World task\(s\) \['reach-v9'\]"):
        metaworld_env.check_tasks(["reach-v3", "reach-v9"])
    import tensorflow  # noqa: F401  (TFDS loads it in this process anyway)

    with pytest.raises(RuntimeError, match="TensorFlow is loaded in this process"):
        metaworld_env.MetaWorldTask(TASK)



def test_lerobot_format_episodes_train_and_act_in_the_closed_loop(dataset_dir, tmp_path):
    from data_pipelines.sources.lerobot import LeRobotSource
    from wamjax.train.loop import train

    out = str(tmp_path / "data")
    root = collect_metaworld(out, [TASK], 2, resolution=(32, 32), data_format="lerobot")
    assert root.endswith("metaworld_lerobot")
    lerobot, rlds = LeRobotSource(out, "lerobot:metaworld_lerobot"), EpisodeSource(dataset_dir, "metaworld")
    assert len(lerobot) == len(rlds) == 2
    for index in range(2):  # the same expert episodes, standardized the same way from either format
        np.testing.assert_array_equal(lerobot[index].actions, rlds[index].actions)
        np.testing.assert_array_equal(lerobot[index].proprio, rlds[index].proprio)
        assert lerobot[index].instruction == rlds[index].instruction
        frame = lerobot[index].decode_frame(3, (32, 32))
        assert np.abs(frame.astype(int) - rlds[index].decode_frame(3, (32, 32))).mean() < 8  # H.264 vs JPEG
    stats_lib.save_stats(stats_lib.compute_stats(out, ["lerobot:metaworld_lerobot"]), f"{out}/stats.json")

    config = get_config("size=tiny,stage=action_tune,data=oxe")
    config.train.steps, config.checkpoint.async_save, config.data.batch_size = 2, False, 8
    config.data.data_dir, config.data.datasets = out, "lerobot:metaworld_lerobot"
    config.data.stats_path = f"{out}/stats.json"
    workdir = str(tmp_path / "run")
    train(config, workdir)
    run = closed_loop(f"--checkpoint={workdir}/checkpoints", "--dataset=lerobot:metaworld_lerobot", "--episodes=1",
                      "--max_steps=6", "--num_steps=1", f"--out={tmp_path / 'eval'}")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["tasks"][TASK]["episodes"] == 1 and summary["tasks"][TASK]["mean_return"] > 0
