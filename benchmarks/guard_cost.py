"""``python -m benchmarks.guard_cost [MiB]``: what the node-shared file guard costs a rank.

Maps a file of MiB mebibytes privately (as the node-shared transport maps checkpoint files),
touches every page, then times ``weightcast.workers.file_guard.check_backed`` over it (five
runs, min and median) and the stat and lease checks of :class:`FileGuard` for one file; finally truncates
the file and shows the StorageError the check raises instead of a SIGBUS.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time


def main(argv: list[str]) -> int:
    import torch
    from weightcast.orchestrator.planner import FileStamp
    from weightcast.workers.file_guard import FileGuard, check_backed
    mib = int(argv[0]) if argv else 512
    with tempfile.TemporaryDirectory(prefix="weightcast-guard-") as d:
        path = os.path.join(d, "f.bin")
        with open(path, "wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(1 << 20))
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=mib << 20)
        t = torch.empty(0, dtype=torch.uint8).set_(storage)
        t[::4096].sum()
        st = os.stat(path)
        guard = FileGuard(d, [FileStamp("f.bin", st.st_size, st.st_mtime_ns)])
        guard.snapshot()
        pages, stats = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            check_backed([t])
            t1 = time.perf_counter()
            guard.check()
            pages.append(t1 - t0)
            stats.append(time.perf_counter() - t1)
        print(f"{mib} MiB mapped, every page touched: check_backed min {min(pages) * 1e3:.3f} ms, median "
              f"{sorted(pages)[2] * 1e3:.3f} ms; stat + lease checks of one file min {min(stats) * 1e6:.1f} us")
        guard.release()  # its read lease would make this process's own truncation wait
        os.truncate(path, (mib << 20) // 3)
        try:
            check_backed([t])
            print("truncated: not detected")
        except Exception as exc:  # noqa: BLE001 - shown
            print(f"truncated to a third: {type(exc).__name__}: {str(exc)[:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
