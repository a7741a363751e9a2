"""Node registration: each node module decorates its classes with @register."""
from __future__ import annotations

NODES: list[type] = []


def register(cls: type) -> type:
    NODES.append(cls)
    return cls
