"""Which Ray node this process runs on, read without importing or starting Ray."""

from __future__ import annotations

import sys


def ray_node_id() -> str | None:
    """The id of the Ray node this process runs on (a stage's worker, or a connected driver); None outside Ray."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
