"""A compiled train step in a file (`train.compiled_step`): the first start writes it, a later one loads it and
computes the same steps without compiling the step, one of another shape or config is refused naming the
difference, and `compile_check --save` writes a file whose fingerprint is the loop's."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import pytest
from train_utils import get_config

from wamjax import compile_check, compile_steps
from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import load_checkpoint
from wamjax.parallel.mesh import make_mesh
from wamjax.stages import stage_spec
from wamjax.train import compiled_step


def _config(path: str, **overrides):
    config = get_config("size=tiny,stage=video_pretrain")
    config.train.steps, config.checkpoint.every_steps = 2, 2
    config.checkpoint.async_save = False
    config.train.compilation_cache_dir = "off"  # only the file may save a compile here
    config.train.compiled_step = path
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _params(workdir) -> dict:
    _, params = load_checkpoint(ckpt.step_dir(str(workdir), 2), use_ema=False)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    from wamjax.train.loop import train

    root = tmp_path_factory.mktemp("compiled")
    path = str(root / "step.bin")
    train(_config(path), str(root / "first"))
    return root, path


def test_a_second_start_loads_the_step_and_computes_the_same(first, caplog):
    from wamjax.train.loop import train

    root, path = first
    assert os.path.getsize(path) > 0 and not os.path.exists(root / ".step.bin.partial")
    with caplog.at_level(logging.INFO, logger="absl"):
        train(_config(path), str(root / "second"))
    assert any("train step loaded from" in r.getMessage() for r in caplog.records)
    a, b = _params(root / "first"), _params(root / "second")
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        np.testing.assert_array_equal(b[key], value, err_msg=key)


def test_a_step_of_another_shape_or_config_is_refused_naming_it(first, tmp_path):
    from wamjax.train.loop import train

    _, path = first
    with pytest.raises(ValueError, match=r"compiled for another job: argument \d+: .*\(8, .* in the file, .*\(16, "):
        train(_config(path, **{"data.batch_size": 16}), str(tmp_path / "batch"))
    with pytest.raises(ValueError, match=r"config.optim.learning_rate: 0.003 in the file, 0.001 here"):
        train(_config(path, **{"optim.learning_rate": 0.001}), str(tmp_path / "lr"))
    (tmp_path / "junk.bin").write_bytes(b"not a step")
    with pytest.raises(ValueError, match=r"junk.bin is not a compiled step wamjax wrote"):
        train(_config(str(tmp_path / "junk.bin")), str(tmp_path / "junk"))
    config = _config(str(tmp_path / "x.bin"))
    config.stage = "all"
    with pytest.raises(ValueError, match=r"each stage compiles its own step; put \{stage\} in the file name"):
        train(config, str(tmp_path / "all"))


def test_compile_check_saves_a_step_whose_fingerprint_is_the_loops(first, tmp_path):
    import pickle

    _, path = first
    config = _config(path)
    with open(path, "rb") as f:
        written_by_the_loop = pickle.load(f)["fingerprint"]
    # What compile_check fingerprints (its abstract arguments) on this machine's devices equals the loop's.
    mesh = make_mesh(config.mesh)
    _, *args = compile_steps.abstract_train_step(config, "video_pretrain", mesh)
    spec_steps = compile_steps.stage_total_steps(stage_spec(config, "video_pretrain"))
    abstract = compiled_step.fingerprint(config, "video_pretrain", mesh, tuple(args), total_steps=spec_steps,
                                         stage_start_step=0)
    assert compiled_step.difference(written_by_the_loop, abstract) is None
    # For a TPU topology: written, and refused by a job on other devices, naming them.
    saved = str(tmp_path / "tpu.bin")
    config.data.latents_cache = "latents"
    compile_check.check(config, "v5p:2x2x1", xla_flops=False, vae_delta=False, save=saved)
    with open(saved, "rb") as f:
        assert pickle.load(f)["fingerprint"]["devices"]["platform"] == "tpu"
    from wamjax.train.loop import train

    with pytest.raises(ValueError, match=r"devices.platform: tpu in the file, cpu here"):
        train(_config(saved), str(tmp_path / "cpu"))


def test_compile_check_save_is_for_the_train_step():
    config = get_config("size=tiny,stage=action_tune")
    with pytest.raises(compile_steps.CompileCheckError, match=r"--save writes the train step"):
        compile_check.check(config, "v5p:2x2x1", what="inference", save="step.bin")
