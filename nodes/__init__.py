"""UI schemas of Guidance Lab. Each family module registers its nodes on import (explicit list below)."""
from __future__ import annotations

from . import apg, cfgpp, tiny_model  # noqa: F401  (imports register the nodes)
from . import adaptive, demo_model, nfe  # noqa: F401
from . import classifier, fkc, linear_ag  # noqa: F401
from . import erasure, multi_condition, two_model  # noqa: F401
from . import agd, diffier, hypernet  # noqa: F401
from ._registry import NODES

__all__ = ["NODES"]
