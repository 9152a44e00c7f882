"""Closed-loop evaluation of a policy in Meta-World: act a chunk, observe, replan; success rate per task.

    python -m wamjax.eval.closed_loop --checkpoint=WORKDIR/checkpoints --env=metaworld --tasks=reach-v3 \
        --episodes=10 --out=DIR [--max_steps=200] [--seed=1000]
    python -m wamjax.eval.closed_loop --policy=expert --tasks=reach-v3 --episodes=10   # baselines: expert | random
                                                                                       # | replay (blind)

Episodes run on the variants of `MT1(task, seed)` for `--seed` (default 1000; `collect_sim` collects on seed
0, so these are held out). A checkpoint acts through `wamjax.inference.Policy` with its dataset's
normalization stats: each predicted action is held for `data.frame_stride` environment steps (the clip's
frames are that far apart) and mapped from the standard 7-D action back to Meta-World's 4-D one. Chunk-causal
checkpoints roll out over the KV cache (`start_rollout` / `next_actions` / `observe`), others call `infer`
on the newest frame. With `--out`, writes `DIR/summary.json` and one mp4 per episode under `DIR/videos/`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags

from wamjax.eval.agents import VISION_ABLATIONS, ExpertAgent, RandomAgent, ReplayAgent, load_policy_agent
from wamjax.eval.rollout import DEFAULT_EVAL_SEED, evaluate, format_table
from wamjax.eval.server_agent import policy_server
from wamjax.sim import metaworld_env

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if len(FLAGS.resolution) != 2:
        raise app.UsageError(f"--resolution is H,W; got {FLAGS.resolution}")
    log = lambda line: print(line, flush=True)
    run = lambda agent: evaluate(
        agent, FLAGS.tasks, FLAGS.episodes, seed=FLAGS.seed, max_steps=FLAGS.max_steps,
        resolution=tuple(int(v) for v in FLAGS.resolution), camera=FLAGS.camera, out_dir=FLAGS.out,
        video_fps=FLAGS.video_fps, log=log,
    )
    if FLAGS.policy != "checkpoint" and FLAGS.checkpoint:
        raise app.UsageError(f"--checkpoint was given with --policy={FLAGS.policy}; drop one of them")
    if FLAGS.policy == "checkpoint" and not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required with --policy=checkpoint (or pick --policy=expert|random)")
    if FLAGS.openpi_python and not FLAGS.through_server:
        raise app.UsageError("--openpi_python applies to --through_server")
    if FLAGS.through_server:
        if FLAGS.policy != "checkpoint":
            raise app.UsageError("--through_server serves a --checkpoint")
        with policy_server(FLAGS.checkpoint, dataset=FLAGS.dataset, num_steps=FLAGS.num_steps,
                           openpi_python=FLAGS.openpi_python) as agent:
            summary = run(agent)
    elif FLAGS.policy == "checkpoint":
        agent = load_policy_agent(
            FLAGS.checkpoint, dataset=FLAGS.dataset, rollout=FLAGS.rollout, execute=FLAGS.execute_actions,
            execution=FLAGS.execution, control_hz=FLAGS.control_hz,
            num_steps=FLAGS.num_steps, action_steps=FLAGS.action_steps, cfg_scale=FLAGS.cfg_scale, seed=FLAGS.seed,
            mode=FLAGS.mode, vision_ablation=FLAGS.vision_ablation,
            realtime={"video_stop_t": FLAGS.video_stop_t, "step_cache_threshold": FLAGS.step_cache_threshold,
                      "step_cache_mask": None if not FLAGS.step_cache_mask else
                      tuple(int(m) for m in FLAGS.step_cache_mask), "cfg_parallel": FLAGS.cfg_parallel},
        )
        summary = run(agent)
    else:
        agent = {"expert": ExpertAgent, "random": lambda: RandomAgent(FLAGS.seed), "replay": ReplayAgent}[
            FLAGS.policy]()
        summary = run(agent)
    print(format_table(summary, agent.name))
    if FLAGS.out:
        print(f"Wrote {os.path.join(FLAGS.out, 'summary.json')} and {summary['overall']['episodes']} videos")
    sys.stdout.flush()


if __name__ == "__main__":
    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    flags.DEFINE_enum("env", "metaworld", ["metaworld"], "Simulator.")
    flags.DEFINE_enum("policy", "checkpoint", ["checkpoint", "expert", "random", "replay"], "What acts (replay: "
                      "the expert's actions of one collection episode, variant 0 of MT1 seed 0, open loop).")
    flags.DEFINE_string("checkpoint", None, "Checkpoint step directory, or a run's checkpoints/ (newest step).")
    flags.DEFINE_list("tasks", ["reach-v3"], "Meta-World tasks.")
    flags.DEFINE_integer("episodes", 10, "Episodes per task.")
    flags.DEFINE_integer("seed", DEFAULT_EVAL_SEED, "MT1 seed of the task variants (collection uses 0).")
    flags.DEFINE_integer("max_steps", metaworld_env.MAX_EPISODE_STEPS, "Environment steps before giving up.")
    flags.DEFINE_string("out", None, "Directory for summary.json and videos/ (none: print only).")
    flags.DEFINE_list("resolution", ["128", "128"], "H,W of the rendered camera (the policy resizes).")
    flags.DEFINE_string("camera", metaworld_env.DEFAULT_CAMERA, "Camera the policy sees.")
    flags.DEFINE_integer("video_fps", 30, "Frame rate of the written mp4s.")
    flags.DEFINE_string("dataset", "metaworld", "Which dataset's normalization stats the checkpoint acts with.")
    flags.DEFINE_enum("rollout", "auto", ["auto", "infer", "kv_cache"],
                      "auto: the KV cache for chunk-causal checkpoints, infer otherwise.")
    flags.DEFINE_integer("execute_actions", None, "Actions of each predicted chunk to run before replanning "
                         "(--rollout=infer; default: the whole chunk).")
    flags.DEFINE_enum("mode", "joint", ["joint", "imagine_then_act"], "How the checkpoint acts: video and actions "
                      "denoised jointly, or the future video first and the actions inferred from it.")
    flags.DEFINE_integer("num_steps", 4, "Denoising steps.")
    flags.DEFINE_enum("vision_ablation", "none", list(VISION_ABLATIONS), "blank: the checkpoint sees a black frame "
                      "in place of every camera (if it uses its cameras, success falls).")
    flags.DEFINE_integer("action_steps", None, "Denoising steps of the actions (default: num_steps).")
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1.0 = off).")
    flags.DEFINE_float("video_stop_t", 0.0, "Noise level the video's schedule stops at (DreamZero-Flash: > 0).")
    flags.DEFINE_list("step_cache_mask", None, "DiT step caching: one 0/1 per denoising iteration (0 = reuse the "
                                               "last velocity).")
    flags.DEFINE_float("step_cache_threshold", None, "DiT step caching: skip an iteration when the last two "
                                                     "velocities' cosine similarity exceeds it.")
    flags.DEFINE_integer("cfg_parallel", 1, "2: the two CFG branches on two devices.")
    flags.DEFINE_enum("execution", "sync", ["sync", "async"], "async: real-time chunking (the next chunk is "
                      "computed while the current one runs, its first actions held as a clean prefix).")
    flags.DEFINE_float("control_hz", None, "Environment steps per second of the simulated robot: reports how much "
                                           "of the time it idles waiting for actions (needed by --execution=async).")
    flags.DEFINE_bool("through_server", False, "Serve the checkpoint with `wamjax.serving.serve` on a free local "
                      "port and act through websocket requests (openpi protocol, one request per chunk).")
    flags.DEFINE_string("openpi_python", None, "With --through_server: a Python with openpi-client installed "
                        "(its own venv); the requests then go through openpi-client itself.")
    app.run(main)
