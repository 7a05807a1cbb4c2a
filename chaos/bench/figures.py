"""How every benchmark prints its result."""

from __future__ import annotations

import json
from typing import Any


def print_figures(result: dict[str, Any], as_json: bool, width: int, skip: tuple[str, ...] = ()) -> None:
    """One JSON object on stdout (``--json``: what scripts read), or one right-aligned
    ``name: value`` line per figure; ``skip`` leaves bulky keys out of the lines."""
    if as_json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        if k not in skip:
            print(f"{k:>{width}}: {v}")
