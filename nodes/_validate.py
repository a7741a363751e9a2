"""Shared input checks of the node schemas (validate_inputs must name its inputs: a **kwargs there makes the host
skip its own range checks of every input)."""
from __future__ import annotations


def percent_range_error(node: str, **percents) -> str | None:
    """A message when a given schedule fraction lies outside [0, 1]; None when all are fine or not known yet
    (linked inputs reach validate_inputs as None)."""
    for name, value in percents.items():
        if value is not None and not 0.0 <= value <= 1.0:
            return f"{node}: {name} ({value}) must lie in [0, 1] (a fraction of the noise schedule)"
    return None
