"""LoRA post-training: a stage with trainable=lora trains only the adapters and the action modules (the base stays
bit-identical), and its export loads into diffusers as a PEFT adapter equal to the merged weights and to wamjax."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from train_utils import get_config

from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import load_checkpoint
from wamjax.export import lora as lora_lib
from wamjax.export import to_torch
from wamjax.models import wam
from wamjax.models.config import SIZES, ModelConfig, model_config_from_run
from wamjax.stages import stage_spec

RANK = 4
SIZES_TINY = SIZES["tiny"]


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _run(workdir, stage: str, steps: int, **lora):
    from wamjax.train.loop import train

    config = get_config(f"size=tiny,stage={stage}")
    config.train.steps, config.train.log_every, config.checkpoint.every_steps = steps, 1, steps
    config.checkpoint.async_save = False
    for key, value in lora.items():
        setattr(config.lora, key, value)
    return config, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base from video pretraining, then LoRA action tuning initialized from it."""
    root = tmp_path_factory.mktemp("lora")
    config, train = _run(root, "video_pretrain", 2)
    train(config, str(root / "base"))
    base_step = ckpt.step_dir(str(root / "base"), 2)
    config, train = _run(root, "action_tune", 3, rank=RANK)
    config.stages.action_tune.trainable = "lora"
    config.stages.action_tune.init_from = str(base_step)
    train(config, str(root / "lora"))
    return root, str(base_step), str(ckpt.step_dir(str(root / "lora"), 3))


def test_a_lora_stage_trains_only_adapters_and_action_modules(runs):
    _, base_step, lora_step = runs
    _, base = load_checkpoint(base_step, use_ema=False)
    _, tuned = load_checkpoint(lora_step, use_ema=False)
    base, tuned = _flat(base), _flat(tuned)
    adapters = [k for k in tuned if k.endswith(("lora_a", "lora_b"))]
    assert len(adapters) == 2 * 6  # q, k, v, o and both FFN projections, stacked over the layers
    for key, value in base.items():  # the frozen base: bit-identical after training
        np.testing.assert_array_equal(tuned[key], value, err_msg=key)
    assert all(np.abs(tuned[k]).max() > 0 for k in adapters if k.endswith("lora_b"))  # B starts at zero: trained
    assert any(k.startswith("actions/") for k in tuned)
    # No optimizer moments for the frozen base: the optimizer state is a small fraction of the parameters.
    tree = ckpt.saved_state_tree(lora_step)
    size = lambda t: sum(int(np.prod(m.shape)) for m in jax.tree.leaves(t))
    trainable = sum(v.size for k, v in tuned.items() if k.startswith("actions/") or k in adapters)
    assert size(tree["opt_state"]) <= 2 * trainable + 64 < size(tree["params"])


@pytest.fixture(scope="module")
def exports(runs):
    root, _, lora_step = runs
    out = {}
    for mode in ("adapters", "merge"):
        out[mode] = str(root / f"export_{mode}")
        summary = to_torch.export_checkpoint(lora_step, out[mode], lora=mode)
        assert any(f.endswith(lora_lib.LORA_WEIGHTS_NAME) for f in summary["files"]) == (mode == "adapters")
    return out


def test_diffusers_loads_the_adapter_and_it_equals_the_merged_weights_and_wamjax(runs, exports):
    _, _, lora_step = runs
    run_config, params = load_checkpoint(lora_step, use_ema=True)
    cfg = model_config_from_run(run_config)
    assert cfg.lora_rank == RANK
    base = WanTransformer3DModel.from_pretrained(os.path.join(exports["adapters"], "transformer")).eval()
    adapter_file = os.path.join(exports["adapters"], "lora", lora_lib.LORA_WEIGHTS_NAME)
    from safetensors.torch import load_file

    adapter = load_file(adapter_file)
    # diffusers 0.42 looks for a pickled .bin in a folder unless told the file is safetensors.
    base.load_lora_adapter(os.path.join(exports["adapters"], "lora"), use_safetensors=True, adapter_name="robot",
                           prefix="transformer")
    # Every adapter tensor landed on a module: none missing, none unexpected.
    loaded = {k for k in base.state_dict() if ".lora_" in k}
    want = {k.removeprefix("transformer.").replace(".lora_A.weight", ".lora_A.robot.weight")
            .replace(".lora_B.weight", ".lora_B.robot.weight") for k in adapter}
    assert loaded == want, sorted(loaded ^ want)[:4]
    merged = WanTransformer3DModel.from_pretrained(os.path.join(exports["merge"], "transformer")).eval()
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 3, 4, 4, 16)).astype(np.float32)
    t = np.array([300.0], np.float32)
    text = rng.standard_normal((1, 8, cfg.text_dim)).astype(np.float32)
    torch_in = (torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(t), torch.from_numpy(text))
    with torch.no_grad():
        a = base(*torch_in, return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
        b = merged(*torch_in, return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    ours = np.asarray(jax.jit(wam.wam_forward, static_argnums=0)(cfg, params, latents, t, text).video)
    assert np.abs(a - b).max() < 1e-4 and np.abs(a - ours).max() < 1e-4
    # The adapters matter: the base alone differs.
    base.disable_lora()
    with torch.no_grad():
        alone = base(*torch_in, return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(alone - a).max() > 1e-5
    # The adapter file is a small fraction of the full weights.
    full = sum(os.path.getsize(os.path.join(exports["merge"], "transformer", f))
               for f in os.listdir(os.path.join(exports["merge"], "transformer")) if f.endswith(".safetensors"))
    assert os.path.getsize(adapter_file) < 0.5 * full
    with open(os.path.join(exports["merge"], "wam_config.json")) as f:
        assert json.load(f)["model"]["lora_rank"] == 0  # the whole-WAM file holds merged weights


def test_bad_lora_settings_are_named():
    config = get_config("size=tiny,stage=action_tune")
    config.stages.action_tune.trainable = "lora"
    with pytest.raises(ValueError, match=r"stages.action_tune.trainable=lora but lora.rank=0"):
        stage_spec(config, "action_tune")
    with pytest.raises(ValueError, match=r"lora.rank=-1; expected >= 1"):
        ModelConfig(lora_rank=-1)
    with pytest.raises(ValueError, match=r"lora.targets='q,attn_x': \['attn_x'\] name no layer"):
        ModelConfig(lora_rank=4, lora_targets="q,attn_x")


def test_adapters_onto_a_base_of_another_shape_are_refused(runs, tmp_path):
    _, _, lora_step = runs
    config, train = _run(tmp_path, "action_tune", 1, rank=2 * RANK)
    config.stages.action_tune.trainable = "lora"
    config.stages.action_tune.init_from = lora_step
    with pytest.raises(ValueError, match=r"lora_a'\]? has shape \(2, \d+, 4\); the model needs \(2, \d+, 8\)"):
        train(config, str(tmp_path / "other"))


def test_lora_flops_match_xla_and_the_frozen_base_costs_no_weight_gradients():
    import dataclasses

    from wamjax.flops import analytic, xla
    from wamjax.flops.stage import train_multipliers, train_step_flops

    cfg = dataclasses.replace(ModelConfig.from_dict({**SIZES_TINY}), lora_rank=8, lora_targets="q,k,v,o,cross,ffn")
    shape = analytic.SequenceShape(mode="joint", num_frames=9, resolution=(32, 32), text_length=8)
    counted = analytic.forward_flops(cfg, shape, batch=2, kernel="dot_product")
    assert counted["lora_adapters"] > 0
    assert counted["total"] == pytest.approx(xla.xla_forward_flops(cfg, shape, batch=2), rel=0.03)
    lora, full = train_multipliers("lora"), train_multipliers("all")
    assert lora["lora_adapters"] == 3.0 and lora["ffn"] == 2.0 and lora["action_decoder"] == 3.0  # no weight grads
    config = get_config("size=tiny,stage=action_tune")
    config.lora.rank = RANK
    tuned = train_step_flops(stage_spec(config, "action_tune"))
    config.stages.action_tune.trainable = "lora"
    cheaper = train_step_flops(stage_spec(config, "action_tune"))
    assert cheaper.train_per_step < tuned.train_per_step
    assert full["ffn"] == 3.0


def _keys(tree) -> list[str]:
    return sorted("/".join(str(getattr(k, "key", k)) for k in path) for path, _ in
                  jax.tree_util.tree_flatten_with_path(tree)[0])


def _state_bytes(step_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(step_dir, "state"))
               for f in files)


@pytest.fixture(scope="module")
def adapters_only(runs):
    """The LoRA stage of `runs` again, saving adapters only (a checkpoint every step)."""
    root, base_step, _ = runs
    config, train = _run(root, "action_tune", 3, rank=RANK, save_adapters_only=True)
    config.stages.action_tune.trainable = "lora"
    config.stages.action_tune.init_from = base_step
    config.checkpoint.every_steps = 1
    train(config, str(root / "adapters"))
    return config, str(root / "adapters")


def test_an_adapters_only_checkpoint_is_small_and_reads_back_onto_its_base(runs, adapters_only):
    _, base_step, lora_step = runs
    _, workdir = adapters_only
    step = str(ckpt.step_dir(workdir, 3))
    saved = _keys(ckpt.saved_state_tree(step)["params"])
    assert saved and all(k.startswith("actions/") or k.endswith(("lora_a", "lora_b")) for k in saved)
    assert ckpt.read_json_item(step, "config")["lora"]["base"] == base_step
    # The frozen base is not in it: at this size the action modules and the Adam moments are most of what is left.
    count = lambda tree: sum(int(np.prod(m.shape)) for m in jax.tree.leaves(tree))
    assert count(ckpt.saved_state_tree(step)["params"]) < 0.4 * count(ckpt.saved_state_tree(lora_step)["params"])
    assert _state_bytes(step) < _state_bytes(lora_step)  # on disk, Orbax's per-array overhead dominates here
    # Read back onto the base it names, it is the run that saved every parameter.
    _, full = load_checkpoint(lora_step, use_ema=False)
    run_config, back = load_checkpoint(step, use_ema=False)
    full, back = _flat(full), _flat(back)
    assert sorted(back) == sorted(full)
    for key, value in full.items():
        np.testing.assert_allclose(back[key], value, rtol=0, atol=1e-6, err_msg=key)
    # The export reads it the same way: the adapters file equals the full run's.
    out = to_torch.export_checkpoint(step, os.path.join(workdir, "export"), lora="adapters")
    assert any(f.endswith(lora_lib.LORA_WEIGHTS_NAME) for f in out["files"])
    # Onto a diffusers folder holding the same base: the same parameters.
    to_torch.export_checkpoint(base_step, os.path.join(workdir, "base_diffusers"))
    _, onto_folder = load_checkpoint(step, use_ema=False, base=os.path.join(workdir, "base_diffusers", "transformer"))
    for key, value in _flat(onto_folder).items():
        np.testing.assert_allclose(value, back[key], rtol=0, atol=1e-6, err_msg=key)
    assert model_config_from_run(run_config).lora_rank == RANK


def test_an_adapters_only_stage_resumes_exactly(adapters_only):
    config, workdir = adapters_only
    from wamjax.train.loop import train

    _, final = load_checkpoint(ckpt.step_dir(workdir, 3), use_ema=False)
    final_saved = _flat(ckpt.restore_params(ckpt.step_dir(workdir, 3))[0])
    import shutil

    resumed = os.path.join(workdir + "_resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(ckpt.step_dir(resumed, 3))  # killed before step 3 was saved: resumes from step 2
    train(config, resumed)
    again = _flat(ckpt.restore_params(ckpt.step_dir(resumed, 3))[0])
    assert sorted(again) == sorted(final_saved)
    for key, value in final_saved.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_adapters_only_after_a_stage_of_the_same_job_keep_its_base(tmp_path):
    from wamjax.train.loop import train

    config, _ = _run(tmp_path, "all", 2, rank=RANK, save_adapters_only=True)
    config.stages.action_tune.trainable = "lora"
    config.checkpoint.every_steps, config.checkpoint.keep = 1, 1
    train(config, str(tmp_path / "job"))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "job" / "checkpoints") if d.isdigit())
    assert steps == [2, 4]  # keep=1, and the video stage's last step: the adapters' base
    base, last = (str(ckpt.step_dir(str(tmp_path / "job"), s)) for s in (2, 4))
    assert ckpt.read_json_item(last, "config")["lora"]["base"] == os.path.abspath(base)
    _, tuned = load_checkpoint(last, use_ema=False)
    _, video = load_checkpoint(base, use_ema=False)
    for key, value in _flat(video).items():
        if not key.startswith("actions/") and not key.endswith(("lora_a", "lora_b")):  # the frozen base
            np.testing.assert_array_equal(_flat(tuned)[key], value, err_msg=key)


def test_adapters_only_settings_and_bases_that_do_not_fit_are_named(runs, adapters_only, tmp_path):
    from wamjax.checkpoint import adapters
    from wamjax.train.loop import train

    config, train_fn = _run(tmp_path, "action_tune", 1, rank=RANK, save_adapters_only=True)
    config.stages.action_tune.trainable = "lora"
    with pytest.raises(ValueError, match=r"stage 'action_tune' has no base to save its adapters against"):
        train(config, str(tmp_path / "no_base"))
    config.lora.base = "/somewhere"
    with pytest.raises(ValueError, match=r"lora.base='/somewhere': it is written by the trainer"):
        train(config, str(tmp_path / "set_base"))
    _, base_step, _ = runs
    _, base = load_checkpoint(base_step, use_ema=False)
    step = ckpt.step_dir(adapters_only[1], 3)
    saved, _ = ckpt.restore_params(step)
    wider = jax.tree.map(np.asarray, base)
    q = wider["blocks"]["layers"]["block"]["attn1"]["to_q"]
    q["kernel"] = np.zeros((*q["kernel"].shape[:-2], q["kernel"].shape[-2] + 8, q["kernel"].shape[-1]), np.float32)
    with pytest.raises(ValueError, match=r"attn1/to_q/lora_a has shape \(2, \d+, 4\); the base's "
                                         r"blocks/layers/block/attn1/to_q/kernel has shape \(2, \d+, \d+\)"):
        adapters.onto_base(wider, saved, where="test")
    with pytest.raises(ValueError, match=r"holds every parameter \(not an adapters-only step\)"):
        load_checkpoint(base_step, base=base_step)


def test_a_stage_initialized_from_an_adapters_only_checkpoint_gets_its_base_too(runs, adapters_only, tmp_path):
    _, base_step, _ = runs
    config, train = _run(tmp_path, "action_tune", 1, rank=RANK)
    config.stages.action_tune.trainable = "lora"
    config.stages.action_tune.init_from = str(ckpt.step_dir(adapters_only[1], 3))
    config.optim.learning_rate = 0.0  # one step that changes nothing: the start is what init_from read
    train(config, str(tmp_path / "next"))
    _, start = load_checkpoint(ckpt.step_dir(str(tmp_path / "next"), 1), use_ema=False)
    _, source = load_checkpoint(ckpt.step_dir(adapters_only[1], 3), use_ema=False)
    start, source = _flat(start), _flat(source)
    assert sorted(start) == sorted(source)
    for key, value in source.items():
        np.testing.assert_array_equal(start[key], value, err_msg=key)
