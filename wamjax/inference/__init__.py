"""Policy inference: context frames + proprio + instruction -> action chunk; chunk-wise KV-cached rollouts."""

from wamjax.inference.kv_cache import ChunkedRollout, ChunkGeometry
from wamjax.inference.policy import Policy, unnormalize
from wamjax.inference.session import ClosedLoopSession

__all__ = ["ChunkGeometry", "ChunkedRollout", "ClosedLoopSession", "Policy", "unnormalize"]
