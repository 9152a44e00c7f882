"""optim.skip_step_on_spike: an update whose loss jumps above a multiple of its running mean is skipped, counted
in metrics and in the FLOP report."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_utils import get_config, metrics_rows

from wamjax.flops import report
from wamjax.train.optimizer import SpikeGuardState, skip_on_spike, spike_skipped

FACTOR = 1.5


def _run(losses, factor=3.0, window=3):
    tx = skip_on_spike(optax.sgd(1.0, momentum=0.5), factor, window)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    applied, counts = [], []
    for loss in losses:
        grads = {"w": jnp.ones(2)}
        before = state
        updates, state = tx.update(grads, state, params, loss=jnp.float32(loss))
        params = optax.apply_updates(params, updates)
        applied.append(bool(np.any(np.asarray(updates["w"]) != 0)))
        skipped, total = spike_skipped(state)
        assert bool(skipped) != applied[-1]
        if not applied[-1]:  # the inner optimizer's momentum is left as it was
            np.testing.assert_array_equal(before.inner[0].trace["w"], state.inner[0].trace["w"])
        counts.append(int(total))
    return applied, counts


def test_a_spike_is_skipped_once_the_mean_has_a_window_of_losses():
    # Three losses of 1 fill the window; 10 is a spike; 2 is not (< 3 x 1); 100 is.
    applied, counts = _run([1.0, 1.0, 1.0, 10.0, 2.0, 100.0, 1.0])
    assert applied == [True, True, True, False, True, False, True]
    assert counts == [0, 0, 0, 1, 1, 2, 2]
    # Before the window is full nothing is judged, however large the loss.
    assert _run([1.0, 50.0, 1.0])[0] == [True, True, True]


def test_a_lasting_shift_becomes_the_new_level_after_a_window_of_skips():
    applied, _ = _run([1.0, 1.0, 1.0] + [10.0] * 6, window=3)
    # Three skips in a row, then 10 is taken as the new level and the mean restarts from it.
    assert applied == [True, True, True, False, False, False, True, True, True]


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="optim.skip_step_on_spike=1.0"):
        skip_on_spike(optax.sgd(1.0), 1.0, 3)
    with pytest.raises(ValueError, match="optim.spike_window_steps=0"):
        skip_on_spike(optax.sgd(1.0), 2.0, 0)


def test_the_loop_counts_spike_skips_in_metrics_and_the_report(tmp_path):
    from wamjax.train.loop import train

    config = get_config("size=tiny,stage=video_pretrain")
    config.train.steps, config.train.log_every = 8, 1
    config.checkpoint.every_steps = 100
    # A learning rate far too high from the first step: an update taken blows the next loss up.
    config.optim.learning_rate, config.optim.warmup_steps = 1.0, 0
    config.optim.skip_step_on_spike, config.optim.spike_window_steps = FACTOR, 2
    (result,) = train(config, str(tmp_path))
    assert isinstance(result.state.opt_state.inner_state, SpikeGuardState)
    rows = metrics_rows(str(tmp_path))
    skipped = [r["spike_skipped"] for r in rows]
    assert [r["stage_spike_skips"] for r in rows] == list(np.cumsum(skipped))
    assert 0 < sum(skipped) < len(rows)
    assert all(r["update_skipped"] >= r["spike_skipped"] for r in rows)
    # A skipped step is judged against the mean of the losses taken: each one is above the multiple.
    taken, in_a_row = [r["loss"] for r in rows[:2]], 0
    assert not any(r["spike_skipped"] for r in rows[:2])  # the window fills first
    for r in rows[2:]:
        mean = np.average(taken, weights=0.5 ** np.arange(len(taken))[::-1])  # decay 1 - 1/window
        if r["spike_skipped"]:
            assert r["loss"] > FACTOR * mean and in_a_row < 2 and len(taken) >= 2
            in_a_row += 1
        else:  # within the multiple, or taken after a window of skips, or while the restarted mean fills
            assert r["loss"] <= FACTOR * mean or in_a_row == 2 or len(taken) < 2
            taken = [r["loss"]] if in_a_row == 2 else [*taken, r["loss"]]
            in_a_row = 0
    (summary,), _ = report.summarize([str(tmp_path)])
    assert summary["spike_skips"] == sum(skipped)
