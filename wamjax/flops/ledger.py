"""The FLOP ledger: cumulative model FLOPs (and hardware FLOPs beside them), steps, samples, tokens and wall
time per stage.

It is saved with every checkpoint (`to_json()` -> a JSON-ready dict) and restored with it (`from_json`), so
totals survive restarts: steps re-run after a resume were not in the restored ledger and are counted once.

Units: every stage record names the count its `flops` are in. `model` (MODEL_UNITS) counts self-attention over
the (query, key) pairs the mask lets a query see; ledgers written before that count existed hold no units and
are read as `dense` (DENSE_UNITS: every pair counted, masked or not). A dense stage takes no more steps until
`to_model_units` converts it, so the two are never summed or budgeted together unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

MODEL_UNITS = "model"
DENSE_UNITS = "dense"
UNITS = (MODEL_UNITS, DENSE_UNITS)


@dataclasses.dataclass
class StageRecord:
    """Totals of one stage."""

    start_step: int = 0  # global step at which the stage started
    end_step: int | None = None  # global step at which it ended; None while it runs
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0  # model FLOPs (forward + backward, no remat recompute)
    seconds: float = 0.0  # wall seconds spent in steps
    frozen_flops: float = 0.0  # FLOPs of frozen parts run in the step (VAE encoder), kept apart from model FLOPs
    hardware_flops: float = 0.0  # what the kernels computed (skipped blocks not, masked scores and remat yes)
    units: str = MODEL_UNITS  # what `flops` counts (module docstring)


class FlopLedger:
    """Cumulative totals per stage, in the order the stages started."""

    def __init__(self, stages: dict[str, StageRecord] | None = None, current_stage: str | None = None):
        self.stages: dict[str, StageRecord] = dict(stages or {})
        self.current_stage = current_stage

    # -- stage lifecycle --
    def start_stage(self, stage: str, start_step: int) -> None:
        """Opens `stage` at global step `start_step` (fresh totals) and makes it current."""
        self.stages[stage] = StageRecord(start_step=int(start_step))
        self.current_stage = stage

    def end_stage(self, stage: str, step: int) -> None:
        """Marks `stage` completed at global step `step`."""
        self._record(stage).end_step = int(step)

    @property
    def completed_stages(self) -> list[str]:
        return [name for name, rec in self.stages.items() if rec.end_step is not None]

    @property
    def stage_start_step(self) -> dict[str, int]:
        return {name: rec.start_step for name, rec in self.stages.items()}

    @property
    def stage_end_step(self) -> dict[str, int | None]:
        return {name: rec.end_step for name, rec in self.stages.items()}

    # -- accounting --
    def record(
        self, stage: str, step_flops: float, samples: int, tokens: int, seconds: float, frozen_flops: float = 0.0,
        hardware_flops: float = 0.0,
    ) -> None:
        """Adds one completed step of `stage` (`step_flops` model FLOPs); opens the stage at step 0 if it was
        never started. A stage still in dense units (an old checkpoint's) is refused: convert it first."""
        if stage not in self.stages:
            self.start_stage(stage, 0)
        rec = self.stages[stage]
        if rec.units != MODEL_UNITS:
            raise ValueError(f"ledger stage {stage!r} holds {rec.units} FLOPs (written before mask-aware counting); "
                             "convert it with to_model_units before adding model FLOPs to it")
        rec.steps += 1
        rec.samples += int(samples)
        rec.tokens += int(tokens)
        rec.flops += float(step_flops)
        rec.seconds += float(seconds)
        rec.frozen_flops += float(frozen_flops)
        rec.hardware_flops += float(hardware_flops)

    def dense_stages(self) -> list[str]:
        """Stages whose FLOPs are dense counts (restored from a ledger written before mask-aware counting)."""
        return [name for name, rec in self.stages.items() if rec.units == DENSE_UNITS]

    def to_model_units(self, stage: str, model_per_step: float, dense_per_step: float,
                       hardware_per_step: float = 0.0) -> float:
        """Converts a dense-unit stage to model FLOPs, given one step's model, dense and hardware FLOPs (the
        stage's config: every step of a stage costs the same); returns the factor its FLOPs were scaled by."""
        rec = self._record(stage)
        if rec.units == MODEL_UNITS:
            return 1.0
        if dense_per_step <= 0:
            raise ValueError(f"dense_per_step={dense_per_step}; expected a positive number")
        steps_worth = rec.flops / dense_per_step
        rec.flops, rec.hardware_flops = steps_worth * model_per_step, steps_worth * hardware_per_step
        rec.units = MODEL_UNITS
        return model_per_step / dense_per_step

    def stage_flops(self, stage: str) -> float:
        return self.stages[stage].flops if stage in self.stages else 0.0

    def stage_hardware_flops(self, stage: str) -> float:
        return self.stages[stage].hardware_flops if stage in self.stages else 0.0

    def stage_units(self, stage: str) -> str:
        return self.stages[stage].units if stage in self.stages else MODEL_UNITS

    def stage_frozen_flops(self, stage: str) -> float:
        return self.stages[stage].frozen_flops if stage in self.stages else 0.0

    def stage_steps(self, stage: str) -> int:
        return self.stages[stage].steps if stage in self.stages else 0

    def stage_samples(self, stage: str) -> int:
        return self.stages[stage].samples if stage in self.stages else 0

    def stage_tokens(self, stage: str) -> int:
        return self.stages[stage].tokens if stage in self.stages else 0

    def stage_seconds(self, stage: str) -> float:
        return self.stages[stage].seconds if stage in self.stages else 0.0

    def total_flops(self) -> float:
        """Model FLOPs over all stages; an error while some stage holds dense counts."""
        dense = self.dense_stages()
        if dense:
            raise ValueError(f"ledger stages {dense} hold dense FLOP counts; the others model FLOPs: not summed")
        return float(sum(rec.flops for rec in self.stages.values()))

    # -- budgets --
    def budget_fraction(self, stage: str, budget: float) -> float | None:
        """Fraction of `budget` FLOPs spent by `stage`; None when there is no budget (budget <= 0)."""
        if budget <= 0:
            return None
        return self.stage_flops(stage) / budget

    def flops_per_second(self, stage: str) -> float | None:
        """Mean achieved model FLOP/s of `stage` so far; None before any timed step."""
        seconds = self.stage_seconds(stage)
        return self.stage_flops(stage) / seconds if seconds > 0 else None

    def eta_seconds(self, stage: str, budget: float, flops_per_s: float | None = None) -> float | None:
        """Seconds until `stage` spends `budget` at `flops_per_s` (default: its mean rate so far).

        None when there is no budget or no rate yet; 0 once the budget is spent.
        """
        if budget <= 0:
            return None
        remaining = max(budget - self.stage_flops(stage), 0.0)
        if remaining == 0:
            return 0.0
        rate = self.flops_per_second(stage) if flops_per_s is None else flops_per_s
        if not rate or rate <= 0:
            return None
        return remaining / rate

    def remaining_steps(self, stage: str, budget: float, step_flops: float) -> int | None:
        """Whole steps of `step_flops` left in `budget` for `stage`; None without a budget."""
        if budget <= 0:
            return None
        return steps_for_budget(max(budget - self.stage_flops(stage), 0.0), step_flops)

    # -- serialization --
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what the checkpoint's `ledger` item stores)."""
        return {
            "units": MODEL_UNITS,  # what a new stage counts; each stage names its own
            "current_stage": self.current_stage,
            "stages": {name: dataclasses.asdict(rec) for name, rec in self.stages.items()},
        }

    @classmethod
    def from_json(cls, value: dict[str, Any] | str | bytes) -> FlopLedger:
        """Restores a ledger from `to_json()`'s dict or its JSON text, naming a malformed stage entry. A stage
        without `units` (a ledger written before mask-aware counting) is read as DENSE_UNITS."""
        if isinstance(value, (str, bytes)):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise TypeError(f"ledger JSON is a {type(value).__name__}; expected an object with 'stages'")
        known = {f.name for f in dataclasses.fields(StageRecord)}
        stages = {}
        for name, rec in (value.get("stages") or {}).items():
            unknown = sorted(set(rec) - known)
            if unknown:
                raise KeyError(f"ledger stage {name!r} has unknown key(s) {unknown}; known: {sorted(known)}")
            rec = {"units": DENSE_UNITS, **rec}
            if rec["units"] not in UNITS:
                raise ValueError(f"ledger stage {name!r} has units {rec['units']!r}; known: {list(UNITS)}")
            stages[name] = StageRecord(**rec)
        return cls(stages, value.get("current_stage"))

    def _record(self, stage: str) -> StageRecord:
        if stage not in self.stages:
            raise KeyError(f"stage {stage!r} was never started in this ledger; started: {list(self.stages)}")
        return self.stages[stage]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FlopLedger)
            and self.current_stage == other.current_stage
            and self.stages == other.stages
        )

    def __repr__(self) -> str:
        return f"FlopLedger(current_stage={self.current_stage!r}, stages={self.stages!r})"


def steps_for_budget(budget: float, flops_per_step: float) -> int:
    """Whole steps of `flops_per_step` that `budget` FLOPs buy (never overspending)."""
    if flops_per_step <= 0:
        raise ValueError(f"flops_per_step={flops_per_step}; expected a positive number")
    if budget <= 0:
        return 0
    # A budget that is an exact multiple must not lose a step to rounding.
    return int(math.floor(budget / flops_per_step * (1 + 1e-12)))


def stage_step_count(steps: int, budget: float, flops_per_step: float) -> int:
    """Steps a stage runs: its `steps`, or the fewer that its FLOP budget buys (`budget` <= 0: no budget).

    The loop stops on this count, the learning-rate schedule is built for it and `flops.estimate` prints it.
    """
    if budget <= 0:
        return int(steps)
    return min(int(steps), steps_for_budget(budget, flops_per_step))


_PREFIXES = (
    (1e21, "ZFLOPs"),
    (1e18, "EFLOPs"),
    (1e15, "PFLOPs"),
    (1e12, "TFLOPs"),
    (1e9, "GFLOPs"),
    (1e6, "MFLOPs"),
)


def format_flops(flops: float | None) -> str:
    """FLOPs with an SI prefix: 9.1e21 -> '9.10 ZFLOPs'."""
    if flops is None:
        return "-"
    for scale, unit in _PREFIXES:
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOPs"
