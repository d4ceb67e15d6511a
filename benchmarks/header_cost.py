"""``python -m benchmarks.header_cost [COUNTS...]``: what a huge safetensors header costs the planner.

For each tensor count, writes one ``model.safetensors`` holding that many 4-byte tensors (a
header of about 104 bytes per tensor: 700k tensors make a 73 MB header, 1M the format's 100 MB
limit) and measures, in a fresh process each: header parsing (``load_index``), the replicate
device map and the plan for 3 CPU ranks on one node, the plan's JSON size, and the process's peak
RSS. Counts above ``safetensors_format.MAX_TENSORS`` are raised for the measurement and then
show what the limit refuses. Prints one markdown row per count.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile


def write_header_file(path: str, count: int) -> int:
    """A valid safetensors file with ``count`` F32[1] tensors; -> header bytes."""
    header = {f"model.layers.{i // 10}.mlp.experts.{i % 10}.w.weight":
              {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(count)}
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(body)))
        fh.write(body)
        fh.truncate(8 + len(body) + 4 * count)
    return len(body)


def measure(root: str) -> dict:
    """In this process: seconds to index, map and plan ``root`` for 3 ranks; peak RSS."""
    import resource
    import time
    from weightcast.orchestrator import safetensors_format
    from weightcast.orchestrator.checkpoint import load_index
    from weightcast.orchestrator.cluster import cluster_from_flags
    from weightcast.orchestrator.device_map import build_device_map
    from weightcast.orchestrator.planner import plan_load, plan_to_json
    safetensors_format.MAX_TENSORS = 10**8
    t0 = time.perf_counter()
    index = load_index(root)
    t1 = time.perf_counter()
    cluster = cluster_from_flags(1, 3, cpu=True)
    dm = build_device_map(index, cluster, "replicate")
    plan = plan_load(index, cluster, dm)
    t2 = time.perf_counter()
    blob = plan_to_json(plan)
    t3 = time.perf_counter()
    return {"index_s": t1 - t0, "plan_s": t2 - t1, "encode_s": t3 - t2, "plan_json_bytes": len(blob),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv: list[str]) -> int:
    counts = [int(a) for a in argv] or [100_000, 400_000, 700_000]
    print("| tensors | header MB | index s | map + plan s | encode s | plan JSON MB | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="weightcast-header-") as d:
            size = write_header_file(os.path.join(d, "model.safetensors"), count)
            out = subprocess.run([sys.executable, "-c", f"import json,benchmarks.header_cost as h;"
                                  f"print(json.dumps(h.measure({d!r})))"], capture_output=True, text=True,
                                 timeout=1800, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {count:,} | {size / 1e6:.1f} | {m['index_s']:.1f} | {m['plan_s']:.1f} | {m['encode_s']:.1f} "
                  f"| {m['plan_json_bytes'] / 1e6:.1f} | {m['peak_rss_bytes'] / 1e9:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
