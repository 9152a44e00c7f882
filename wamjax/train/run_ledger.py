"""Per-stage run bookkeeping saved with every checkpoint: steps, samples, tokens, model FLOPs, wall time."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StageRecord:
    start_step: int = 0
    end_step: int | None = None
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0


class RunLedger:
    """Cumulative totals per stage; restored from checkpoints so totals survive restarts."""

    def __init__(self, stages: dict[str, StageRecord] | None = None, current_stage: str | None = None):
        self.stages: dict[str, StageRecord] = stages or {}
        self.current_stage = current_stage

    # -- stage lifecycle --
    def start_stage(self, stage: str, start_step: int) -> None:
        self.stages[stage] = StageRecord(start_step=start_step)
        self.current_stage = stage

    def end_stage(self, stage: str, step: int) -> None:
        self.stages[stage].end_step = step

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
    def record(self, stage: str, step_flops: float, samples: int, tokens: int, seconds: float) -> None:
        rec = self.stages[stage]
        rec.steps += 1
        rec.samples += int(samples)
        rec.tokens += int(tokens)
        rec.flops += float(step_flops)
        rec.seconds += float(seconds)

    def stage_flops(self, stage: str) -> float:
        return self.stages[stage].flops if stage in self.stages else 0.0

    def stage_steps(self, stage: str) -> int:
        return self.stages[stage].steps if stage in self.stages else 0

    def stage_samples(self, stage: str) -> int:
        return self.stages[stage].samples if stage in self.stages else 0

    def stage_tokens(self, stage: str) -> int:
        return self.stages[stage].tokens if stage in self.stages else 0

    def stage_seconds(self, stage: str) -> float:
        return self.stages[stage].seconds if stage in self.stages else 0.0

    # -- serialization --
    def to_json(self) -> dict[str, Any]:
        return {"current_stage": self.current_stage,
                "stages": {name: dataclasses.asdict(rec) for name, rec in self.stages.items()}}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> RunLedger:
        stages = {name: StageRecord(**rec) for name, rec in value.get("stages", {}).items()}
        return cls(stages, value.get("current_stage"))
