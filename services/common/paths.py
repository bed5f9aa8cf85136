"""Where a Stillhouse installation keeps its local state (embedded mode and the CLI)."""

from __future__ import annotations

import os
from pathlib import Path


def stillhouse_home() -> Path:
    """`$STILLHOUSE_HOME`, or ~/.stillhouse. Read by the CLI before any settings object exists."""
    return Path(os.environ.get("STILLHOUSE_HOME") or Path.home() / ".stillhouse")
