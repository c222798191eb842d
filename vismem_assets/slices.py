"""How work is cut for parallel workers: contiguous, as even as possible, bounded in size."""
from __future__ import annotations


def even_slices(n: int, parts: int = 1, chunk: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) of contiguous slices covering range(n) in order: at most `chunk` items each
    (no bound if None), and at least `parts` slices when there are that many items. None is empty."""
    if parts < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"parts ({parts}) and chunk ({chunk}) must be at least 1")
    if n <= 0:
        return []
    k = max(-(-n // chunk) if chunk else 1, min(parts, n))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
