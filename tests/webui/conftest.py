"""Web UI tier: the workflow helpers of tests/workflows (scripts/workflow_api.py, the workflow list) are shared."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
