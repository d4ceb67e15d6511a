"""The benchmark harness: a tiny end-to-end run through ``weightcast bench`` (2 ranks, one
trial), and the pure pieces (summaries, target checks, lower bounds, markdown markers)."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import markdown, report, targets
from benchmarks.physical import lower_bounds

CKPT_LOADERS = "wc_replicate_node-shared,from_pretrained"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One harness run: tiny checkpoint, N=2, one trial, weightcast and from_pretrained."""
    from benchmarks.cli import main
    out = tmp_path_factory.mktemp("bench")
    results = out / "r.json"
    md = out / "B.md"
    md.write_text(f"# Mine\n\nkept above\n\n{markdown.BEGIN}\nSTALE-TABLES\n{markdown.END}\n\n## Emulated cluster\nkept below\n")
    status = main(["bench", "--quick", "--checkpoints", "tiny", "--nproc", "2", "--trials", "1",
                   "--loaders", CKPT_LOADERS, "--no-cold", "--no-e2e", "--no-physical", "--quiet",
                   "--out", str(out), "--json", str(results), "--md", str(md), "--plots", str(out / "plots")])
    assert status == 0
    return json.loads(results.read_text()), md.read_text(), out


@pytest.mark.timeout(600)
def test_run_has_every_figure(tiny_run):
    data, _, _ = tiny_run
    for key in ("cores", "memory_bytes", "kernel", "torch", "date", "versions"):
        assert key in data["machine"]
    ckpt = data["checkpoints"]["tiny"]["bytes"]
    assert ckpt > 0
    assert data["failures"] == [] and data["skipped"] == []
    assert {r["loader"] for r in data["records"]} == set(CKPT_LOADERS.split(","))
    for rec in data["records"]:
        assert rec["world"] == 2 and rec["wall_s"] > 0 and len(rec["ranks"]) == 2
        for r in rec["ranks"]:
            assert r["mem"]["pss"] > 0 and r["mem"]["private"] > 0 and "anon" in r["mem"]
            assert r["touched"] >= ckpt  # every page of the whole model touched on each rank
    rows = {r["loader"]: r for r in data["rows"]}
    for row in rows.values():
        for key in ("min_s", "median_s", "pss_sum", "private_max", "anon_max", "requested", "wc_time_ratio"):
            assert row[key] is not None
    assert rows["wc_replicate_node-shared"]["requested"] == ckpt  # weightcast read each byte once
    assert rows["from_pretrained"]["requested"] == 2 * ckpt       # each rank loaded everything


@pytest.mark.timeout(600)
def test_run_writes_markdown_and_plots(tiny_run):
    _, text, out = tiny_run
    assert text.startswith("# Mine\n\nkept above") and text.rstrip().endswith("kept below")
    assert "STALE-TABLES" not in text and "### tiny, warm page cache" in text
    assert "GPU figures are not measured" in text
    assert (out / "plots" / "tiny-vs-n.png").stat().st_size > 1000
    assert (out / "plots" / "tiny-timeline-n2.png").stat().st_size > 1000


def _record(loader: str, world: int, wall: float, pss: int, requested: int, mode: str = "warm") -> dict:
    rank = {"mem": {"pss": pss, "private": pss, "anon": 10, "peak_rss": pss}, "base": {"pss": 1, "anon": 5},
            "rchar": 7, "read_bytes": 0, "touched": requested, "requested": requested}
    return {"checkpoint": "c", "mode": mode, "world": world, "loader": loader, "wall_s": wall,
            "ranks": [dict(rank) for _ in range(world)]}


def test_summary_ratios_and_targets():
    recs = [_record("wc_replicate_node-shared", 2, w, 100, 50) for w in (2.0, 1.0, 3.0)]
    recs += [_record("from_pretrained", 2, w, 100, 100) for w in (1.0, 4.0)]
    rows = report.summarize(recs)
    wc = report.find(rows, "c", "warm", 2, "wc_replicate_node-shared")
    fp = report.find(rows, "c", "warm", 2, "from_pretrained")
    assert (wc["min_s"], wc["median_s"], wc["trials"]) == (1.0, 2.0, 3)
    assert wc["pss_sum"] == 200 and wc["requested"] == 100 and fp["requested"] == 200
    assert fp["wc_time_ratio"] == 1.0 and fp["wc_pss_ratio"] == 1.0
    checks = targets.storage_checks(rows, {"c": 100})
    assert len(checks) == 1 and checks[0]["met"] is True
    rep = targets.replicate_checks(rows, "c")
    assert [c["met"] for c in rep[:2]] == [True, True]
    assert rep[2]["met"] is None  # fastsafetensors did not run: not counted as met
    checks = targets.storage_checks(report.summarize([_record("wc_tp_node-shared", 4, 1.0, 1, 30)]), {"c": 100})
    assert checks[0]["met"] is False and "1.2000 x" in checks[0]["measured"]


def test_lower_bounds():
    phys = {"cores": 2, "map_touch_gbps": 10.0, "cold_read_gbps": 2.0}
    b = lower_bounds(phys, 10 * 10**9, 4)
    assert b["replicate"] == pytest.approx(2.0) and b["tp"] == pytest.approx(0.5)
    assert lower_bounds(phys, 10 * 10**9, 4, cold=True)["tp"] == pytest.approx(5.0)


def test_gpu_mode_without_cuda_reports_not_measured(tmp_path):
    import torch
    from benchmarks import gpu
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU figures are measured")
    out = gpu.run("c", str(tmp_path), str(tmp_path), 1)
    assert out["measured"] is False and "CUDA" in out["reason"]


def test_cli_rejects_unknown_loader(tmp_path, capsys):
    from benchmarks.cli import main
    assert main(["--loaders", "nope", "--out", str(tmp_path)]) == 2
    assert "Unknown loader" in capsys.readouterr().err


def test_tp_skipped_on_one_rank():
    from benchmarks.bench import skip_reason
    assert "N >= 2" in skip_reason("wc_tp_node-shared", os.devnull, 1)
    assert skip_reason("from_pretrained", os.devnull, 1) is None
