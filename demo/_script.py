"""What the demo training scripts share when run as `python demo/<script>.py` (this folder is then first on
sys.path): the import paths that boot the host as the tests do, progress lines, and the command line as a weights
file's metadata records it."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:             # tests/host.py boots the host as the tests do
    sys.path.insert(0, str(REPO / "tests"))
if str(REPO) not in sys.path:                       # appended: ComfyUI's top-level `nodes` must win over ours
    sys.path.append(str(REPO))


def log(message: str) -> None:
    """One progress line on stdout."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def recorded_args(argv: list[str]) -> list[str]:
    """The arguments as the file's metadata records them: without --out and --output-dir, which say where the file
    and the collection go, not what is trained, and with paths inside the repository made relative to it (so no
    local paths end up in a shipped file)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--output-dir"):
            skip = True
        elif not a.startswith(("--out=", "--output-dir=")):
            path = Path(a).resolve() if a and not a.startswith("-") and Path(a).exists() else None
            kept.append(str(path.relative_to(REPO)) if path is not None and path.is_relative_to(REPO) else a)
    return kept
