"""``weightcast inspect`` and ``weightcast synth``: output, JSON schema, exit status 2 on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import ckpt_factory as cf  # sets HF_HUB_OFFLINE
import pytest

from weightcast.launch.cli import main
from weightcast.orchestrator.checkpoint import load_index
from test_catalogue import CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_of_transformers_checkpoint(tmp_path, capsys):
    cf.save_tiny_llama(tmp_path, max_shard_size="100KB")
    code, out, err = run(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    summary = json.loads(out)
    index = load_index(tmp_path)
    assert summary["num_tensors"] == len(index.tensors) == len(summary["tensors"])
    assert summary["total_bytes"] == index.total_bytes == summary["metadata"]["total_size"]
    assert summary["dtypes"] == {"F32": index.total_bytes}
    assert [f["name"] for f in summary["files"]] == [f.name for f in index.files]
    assert sum(f["num_tensors"] for f in summary["files"]) == len(index.tensors)
    assert summary["tensors"] == [{"name": t.name, "file": t.file, "dtype": t.dtype,
                                   "shape": list(t.shape), "offset": t.offset, "length": t.length}
                                  for t in index.tensors]


def test_inspect_human_summary(tmp_path, capsys):
    tensors = cf.sample_tensors()
    cf.write_sharded(tmp_path, tensors, shards=2)
    code, out, _ = run(capsys, "inspect", str(tmp_path), "--top", "3")
    assert code == 0
    assert "files: 2" in out and "model-00001-of-00002.safetensors" in out
    assert f"tensors: {len(tensors)}" in out and "bytes per dtype:" in out
    assert "BF16" in out and "I8" in out and "largest tensors:" in out
    largest = out.split("largest tensors:\n")[1].splitlines()[:3]
    assert largest[0].strip().startswith("layers.1.attn.q.weight")  # the F64 one, 512 bytes
    assert "total_size" in out


def test_inspect_repo_id_from_cache(tmp_path, capsys):
    cf.save_tiny_llama(tmp_path / "src")
    cache = tmp_path / "cache"
    cf.build_hf_cache(cache, "acme/tiny", cf.dir_files(tmp_path / "src"))
    code, out, err = run(capsys, "inspect", "acme/tiny", "--cache-dir", str(cache),
                         "--local-files-only", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["repo_id"] == "acme/tiny" and summary["revision"] == cf.DEFAULT_COMMIT
    code, _, err = run(capsys, "inspect", "acme/tiny", "--cache-dir", str(cache), "--revision", "nope")
    assert code == 2 and "nope" in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(CASES))
def test_inspect_rejects_catalogue_case(name, tmp_path, capsys):
    path, _, needle = CASES[name](tmp_path)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 2 and out == ""
    assert err.startswith("weightcast inspect: error: ") and needle in err
    assert "Traceback" not in err


def test_inspect_pickle_dir_mentions_allow_pickle(tmp_path, capsys):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "allow_pickle=True" in err


def test_inspect_real_process_exit_status(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "weightcast.launch.cli", "inspect", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_synth_then_inspect(tmp_path, capsys):
    out_dir = tmp_path / "405b"
    code, out, err = run(capsys, "synth", str(out_dir), "--like", "llama-405b")
    assert code == 0, err
    assert "191 files" in out and "(sparse)" in out
    code, out, _ = run(capsys, "inspect", str(out_dir), "--json")
    summary = json.loads(out)
    assert code == 0 and len(summary["files"]) == 191 and summary["num_tensors"] == 1137
    assert summary["dtypes"] == {"BF16": summary["total_bytes"]}


def test_synth_random_tiny_and_bad_input(tmp_path, capsys):
    code, out, _ = run(capsys, "synth", str(tmp_path / "t"), "--random", "--dtype", "float32",
                       "--max-shard-size", "100KB")
    assert code == 0 and "(sparse)" not in out
    code, _, err = run(capsys, "synth", str(tmp_path / "big"), "--like", "llama-70b", "--random")
    assert code == 2 and "random" in err and not (tmp_path / "big").exists()
    code, _, err = run(capsys, "synth", str(tmp_path / "t"))
    assert code == 2 and "not empty" in err
    code, _, err = run(capsys, "synth", str(tmp_path / "s"), "--max-shard-size", "lots")
    assert code == 2 and "size" in err
