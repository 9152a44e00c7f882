"""The openpi-compatible websocket policy server and a small client for it."""

from wamjax.serving.client import PolicyClient, ServerError
from wamjax.serving.observations import ObservationSchema
from wamjax.serving.serve import PolicyServer

__all__ = ["ObservationSchema", "PolicyClient", "PolicyServer", "ServerError"]
