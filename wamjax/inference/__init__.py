"""Policy inference: context frames + proprio + instruction -> action chunk; chunk-wise KV-cached rollouts."""

from wamjax.inference.kv_cache import ChunkedRollout, ChunkGeometry
from wamjax.inference.policy import ClosedLoopSession, Policy, unnormalize

__all__ = ["ChunkGeometry", "ChunkedRollout", "ClosedLoopSession", "Policy", "unnormalize"]
