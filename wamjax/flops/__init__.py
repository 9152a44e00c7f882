"""FLOPs as a first-class quantity: analytic counts per component, XLA cross-check, ledger, budgets."""

from wamjax.flops.analytic import SequenceShape, StepFlops, forward_flops, train_step_flops
from wamjax.flops.ledger import FlopLedger, steps_for_budget
from wamjax.flops.peak import peak_flops_per_device

__all__ = [
    "FlopLedger",
    "SequenceShape",
    "StepFlops",
    "forward_flops",
    "peak_flops_per_device",
    "steps_for_budget",
    "train_step_flops",
]
