"""Sub-trees of the world-action model's parameters that tests compare."""

from __future__ import annotations

from typing import Any


def backbone_params(params: dict[str, Any]) -> dict[str, Any]:
    """The video-backbone subtree (everything except the action modules and the view embedding)."""
    return {k: v for k, v in params.items() if k not in ("actions", "view_embedding")}
