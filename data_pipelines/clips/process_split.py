"""Which examples of a global stream a JAX process reads: a contiguous block of every global batch.

Process k of p takes examples [k*b, (k+1)*b) of each global batch of p*b, so the global batch, and with it
every per-example random draw in the train step, is the same whatever the number of processes.
"""

from __future__ import annotations

import grain


class _GlobalIndex:
    """Local index -> the example of `dataset` at the matching global position (picklable for workers)."""

    def __init__(self, dataset: grain.MapDataset, process_index: int, process_count: int, per_process_batch: int):
        self.dataset = dataset
        self.process_index = process_index
        self.global_batch = per_process_batch * process_count
        self.per_process_batch = per_process_batch

    def __call__(self, local_index: int):
        step, offset = divmod(int(local_index), self.per_process_batch)
        return self.dataset[step * self.global_batch + self.process_index * self.per_process_batch + offset]


def split_for_process(
    dataset: grain.MapDataset, process_index: int, process_count: int, per_process_batch: int
) -> grain.MapDataset:
    """This process's share of `dataset`, ready to be batched by `per_process_batch` (disjoint across processes)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    if process_count == 1:
        return dataset
    global_batch = per_process_batch * process_count
    local_length = len(dataset) // global_batch * per_process_batch
    return grain.MapDataset.range(local_length).map(
        _GlobalIndex(dataset, process_index, process_count, per_process_batch)
    )
