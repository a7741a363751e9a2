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


def filename_prefix_error(node: str, filename_prefix) -> str | None:
    """A message when a save prefix would leave its folder (absolute, or with '..'): the host refuses it only when
    saving, which for the training nodes is after the whole run; None when fine or not known yet."""
    if filename_prefix is None:
        return None
    parts = str(filename_prefix).replace("\\", "/").split("/")
    drive = len(parts[0]) == 2 and parts[0][1] == ":"                    # C:/… on Windows
    if str(filename_prefix).startswith(("/", "\\")) or ".." in parts or drive:
        return (f"{node}: filename_prefix ({filename_prefix!r}) must stay inside the folder it saves to; use a "
                "relative name without '..' (subfolders are fine, e.g. 'my_run/file')")
    return None


def choice_error(node: str, name: str, value, options) -> str | None:
    """A message when a combo value is not one of its options: ComfyUI 0.3.75 checks the list of a V1 combo only, so
    a V3 io.Combo value sent through the API reaches the node unchecked; None when fine or not known yet."""
    options = list(options)
    if value is None or value in options:
        return None
    return f"{node}: {name} {value!r} is not one of the options; choose one of {', '.join(map(repr, options))}"
