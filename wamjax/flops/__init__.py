"""FLOPs as a first-class quantity: analytic counts per component, XLA cross-check, ledger, budgets."""

from wamjax.flops.analytic import SequenceShape, forward_flops
from wamjax.flops.ledger import FlopLedger, steps_for_budget
from wamjax.flops.peak import peak_flops_per_device
from wamjax.flops.stage import StepFlops, train_step_flops

__all__ = [
    "FlopLedger",
    "SequenceShape",
    "StepFlops",
    "forward_flops",
    "peak_flops_per_device",
    "steps_for_budget",
    "train_step_flops",
]
