"""A progress bar on stderr: tqdm when installed (diffusers pulls it in), else a small one."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional


def progress(items: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: Optional[bool] = None):
    """Iterate ``items`` with a bar on stderr. ``enabled=None``: only when stderr is a terminal."""
    if enabled is None:
        enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not enabled:
        yield from items
        return
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with diffusers' dependencies
        yield from _SimpleBar(items, total, desc)
        return
    yield from tqdm(items, total=total, desc=desc, unit="module", file=sys.stderr, leave=False, dynamic_ncols=True)


class _SimpleBar:
    """``desc [#####-----] 12/30 4.1s`` redrawn in place at most ten times a second."""

    def __init__(self, items, total, desc):
        self.items, self.total, self.desc = items, total, desc

    def __iter__(self):
        start = last = time.monotonic()
        n = 0
        for item in self.items:
            yield item
            n += 1
            now = time.monotonic()
            if now - last >= 0.1 or n == self.total:
                last = now
                self._draw(n, now - start)
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    def _draw(self, n, elapsed):
        if self.total:
            filled = int(30 * n / self.total)
            bar = f"[{'#' * filled}{'-' * (30 - filled)}] {n}/{self.total}"
        else:
            bar = f"{n}"
        sys.stderr.write(f"\r{self.desc} {bar} {elapsed:.1f}s")
        sys.stderr.flush()
