"""Plain-text output shared by the commands."""
from __future__ import annotations

from typing import Iterable, Tuple


def aligned(rows: Iterable[Tuple[str, str]]) -> str:
    """``key  value`` lines with the values aligned in one column (the commands' summaries)."""
    rows = list(rows)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = ["aligned"]
