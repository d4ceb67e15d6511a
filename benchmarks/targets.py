"""The targets weightcast is held to on one machine, checked against a run's rows.

Each check is a dict ``{target, checkpoint, mode, world, measured, limit, met}`` (``met`` None
when a figure it needs is missing, e.g. a peer that could not run). Times compare the min of
the trials, memory the median. Called by :mod:`benchmarks.markdown`; pure.
"""
from __future__ import annotations

from benchmarks.physical import lower_bounds
from benchmarks.report import find

WC = "wc_replicate_node-shared"
BUFFERS = 256 << 20  # weightcast's default bucket: the transport's own buffers


def _check(target: str, ckpt: str, mode: str, world: int, measured: str, limit: str, met: bool | None) -> dict:
    return {"target": target, "checkpoint": ckpt, "mode": mode, "world": world, "measured": measured,
            "limit": limit, "met": met}


def storage_checks(rows: list[dict], sizes: dict[str, int]) -> list[dict]:
    """One check per checkpoint and mode over every weightcast row (each N, placement, transport)."""
    groups: dict[tuple[str, str], list[tuple[float, dict]]] = {}
    for r in rows:
        if r["loader"].startswith("wc_"):
            groups.setdefault((r["checkpoint"], r["mode"]), []).append((r["requested"] / sizes[r["checkpoint"]], r))
    out = []
    for (ckpt, mode), items in groups.items():
        bad = [f"{r['loader']} N={r['world']}: {x:.4f} x" for x, r in items if abs(x - 1.0) > 1e-9]
        worlds = sorted({r["world"] for _, r in items})
        measured = "; ".join(bad) if bad else f"1.0000 x in all {len(items)} weightcast rows (N = {worlds})"
        out.append(_check("storage bytes requested = 1.00 x checkpoint", ckpt, mode, max(worlds), measured,
                          "1.00 x", not bad))
    return out


def replicate_checks(rows: list[dict], ckpt: str) -> list[dict]:
    out = []
    for world in (2, 4):
        wc, fp = find(rows, ckpt, "warm", world, WC), find(rows, ckpt, "warm", world, "from_pretrained")
        if not wc:
            continue
        if fp:
            t, m = wc["min_s"] / fp["min_s"], wc["pss_sum"] / fp["pss_sum"]
            out.append(_check("warm replicate time <= 1.1 x from_pretrained", ckpt, "warm", world,
                              f"{wc['min_s']:.2f} s vs {fp['min_s']:.2f} s = {t:.2f} x", "1.10 x", t <= 1.1))
            out.append(_check("warm replicate summed PSS <= 1.1 x from_pretrained", ckpt, "warm", world,
                              f"{wc['pss_sum'] / 1e9:.2f} GB vs {fp['pss_sum'] / 1e9:.2f} GB = {m:.2f} x", "1.10 x",
                              m <= 1.1))
        for peer in ("fastsafetensors", "accelerate", "load_file", "runai"):
            p = find(rows, ckpt, "warm", world, peer)
            measured = f"{wc['min_s']:.2f} s vs {p['min_s']:.2f} s" if p else "peer did not run"
            out.append(_check(f"warm replicate faster than {peer}", ckpt, "warm", world, measured, "<",
                              (wc["min_s"] < p["min_s"]) if p else None))
    return out


def cold_checks(rows: list[dict], ckpt: str, world: int | None) -> list[dict]:
    if not world:
        return []
    wc, fp = find(rows, ckpt, "cold", world, WC), find(rows, ckpt, "cold", world, "from_pretrained")
    if not (wc and fp):
        return []
    return [_check("cold replicate no slower than from_pretrained", ckpt, "cold", world,
                   f"{wc['min_s']:.2f} s vs {fp['min_s']:.2f} s = {wc['min_s'] / fp['min_s']:.2f} x", "1.00 x",
                   wc["min_s"] <= fp["min_s"])]


def tp_checks(rows: list[dict], ckpt: str, size: int, world: int = 4) -> list[dict]:
    wc = find(rows, ckpt, "warm", world, "wc_tp_node-shared")
    if not wc:
        return []
    limit = size / world + BUFFERS
    out = [_check("tp: private memory per rank <= model / N + buffers", ckpt, "warm", world,
                  f"{wc['anon_load_max'] / 1e9:.3f} GB (anonymous, grown during the load)",
                  f"{limit / 1e9:.3f} GB", wc["anon_load_max"] <= limit)]
    hf = find(rows, ckpt, "warm", world, "tp_auto")
    out.append(_check("tp: time <= transformers tp_plan=auto", ckpt, "warm", world,
                      f"{wc['min_s']:.2f} s vs {hf['min_s']:.2f} s" if hf else "tp_plan=auto did not run", "<=",
                      (wc["min_s"] <= hf["min_s"]) if hf else None))
    return out


def bound_checks(rows: list[dict], phys: dict | None, ckpt: str, size: int) -> list[dict]:
    """Replicate against the floor measured side by side (``mmap_touch``: every rank maps and
    touches the files, nothing else); tp against the formula of :func:`lower_bounds`."""
    out = []
    for r in rows:
        if r["checkpoint"] != ckpt or r["loader"] not in (WC, "wc_tp_node-shared"):
            continue
        floor = find(rows, ckpt, r["mode"], r["world"], "mmap_touch")
        if r["loader"] == WC and floor:
            bound, how = floor["min_s"], "measured floor"
        elif phys:
            placement = "tp" if "tp" in r["loader"] else "replicate"
            bound, how = lower_bounds(phys, size, r["world"], r["mode"] == "cold")[placement], "formula bound"
        else:
            continue
        ratio = r["min_s"] / bound
        out.append(_check(f"within 1.3 x the physical lower bound ({r['loader']})", ckpt, r["mode"], r["world"],
                          f"{r['min_s']:.2f} s vs {how} {bound:.2f} s = {ratio:.2f} x", "1.30 x", ratio <= 1.3))
    return out


def simulate_checks(rows: list[dict], sims: list[dict]) -> list[dict]:
    out = []
    for s in sims:
        loader = f"wc_{s['device_map']}_{s['transport']}"
        r = find(rows, s["checkpoint"], s["mode"], s["world"], loader)
        if not r:
            continue
        if "predicted_seconds" not in s:
            out.append(_check(f"plan --simulate within 25% ({loader})", s["checkpoint"], s["mode"], s["world"],
                              s.get("error", "no prediction"), "25%", None))
            continue
        err = s["predicted_seconds"] / r["min_s"] - 1.0
        out.append(_check(f"plan --simulate within 25% ({loader})", s["checkpoint"], s["mode"], s["world"],
                          f"predicted {s['predicted_seconds']:.3f} s vs measured {r['min_s']:.2f} s ({err:+.0%})",
                          "±25%", abs(err) <= 0.25))
    return out


def all_checks(rows: list[dict], suite) -> list[dict]:
    sizes = {n: c["bytes"] for n, c in suite.checkpoints.items()}
    first = next(iter(suite.checkpoints))
    opts = suite.options
    checks = storage_checks(rows, sizes)
    for ckpt in suite.checkpoints:
        checks += replicate_checks(rows, ckpt)
        checks += tp_checks(rows, ckpt, sizes[ckpt])
        checks += bound_checks(rows, suite.physical, ckpt, sizes[ckpt])
    checks += cold_checks(rows, first, opts.get("cold_nproc"))
    checks += simulate_checks(rows, suite.simulate)
    return checks
