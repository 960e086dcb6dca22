"""Plain-text output shared by the commands."""
from __future__ import annotations

from typing import Iterable, Tuple


def aligned(rows: Iterable[Tuple[str, str]]) -> str:
    """``key  value`` lines with the values aligned in one column (the commands' summaries)."""
    rows = list(rows)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def per_second(n: float, seconds: float, unit: str) -> str:
    """'12.3 tokens/s'; three significant digits below 10 ('0.0312 tokens/s': a slow rate is
    never shown as 0.0); 'tokens/s n/a' when nothing was timed."""
    if seconds <= 0 or n <= 0:
        return f"{unit}/s n/a"
    rate = n / seconds
    return f"{rate:.1f} {unit}/s" if rate >= 10 else f"{rate:.3g} {unit}/s"


__all__ = ["aligned", "per_second"]
