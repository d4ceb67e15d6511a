"""A progress bar in bytes for long reads (rank 0 only; tqdm, imported when a bar is shown)."""
from __future__ import annotations

import contextlib


PROGRESS_MIN_BYTES = 512 << 20


@contextlib.contextmanager
def progress_bar(total: int, what: str):
    """A tqdm bar in bytes (GB/s shown) when ``total`` is large enough to be worth one."""
    if total < PROGRESS_MIN_BYTES:
        yield _NoBar()
        return
    from tqdm import tqdm
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"weightcast {what}", leave=False) as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        pass
