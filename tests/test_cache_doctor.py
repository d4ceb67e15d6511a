"""The HF cache doctor: one test per way a copied cache breaks, through the API and the CLI.

Caches are built by hand (tests/hfcache_factory.py); huggingface_hub runs offline and is the judge
of "repaired": `scan_cache_dir()` without warnings, `snapshot_download(local_files_only=True)`
resolving, and the safetensors file loading bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere

import pytest
import torch
from safetensors.torch import load_file

import unprivileged
from hfcache_factory import (HFCache, build_hf_cache, corrupt_blob, default_files, git_blob_sha1,
                             make_absolute_link, make_dangling, make_plain_copy, make_text_link,
                             sha256_hex, tiny_safetensors, write_ref)
from weightcast.launch.cli import main as cli
from weightcast.orchestrator import cache_doctor as doctor
from weightcast.orchestrator.cache_repair import repair, repair_cache
from weightcast.orchestrator.errors import CacheError, CheckpointNotFoundError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "model.safetensors"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(tmp_path) -> HFCache:
    return build_hf_cache(str(tmp_path / "hub"))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def verify_cli(capsys, cache: HFCache, *extra: str) -> tuple[int, str]:
    return run_cli(capsys, "cache", "verify", cache.repo_id, "--cache-dir", cache.cache_dir, *extra)


def repair_cli(capsys, cache: HFCache, *extra: str) -> tuple[int, str]:
    return run_cli(capsys, "cache", "repair", cache.repo_id, "--cache-dir", cache.cache_dir, *extra)


def statuses(cache: HFCache, **kw) -> dict[str, str]:
    report = doctor.verify_cache(cache.repo_id, cache_dir=cache.cache_dir, **kw)
    return {f.name: f.status for f in report.files}


def tree_state(top: str) -> dict[str, tuple]:
    """Everything about a tree that a repair could change (kind, mode, link target, content)."""
    state = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            body = os.readlink(p) if os.path.islink(p) else (
                open(p, "rb").read() if os.path.isfile(p) else None)
            state[os.path.relpath(p, top)] = (st.st_mode, body)
    return state


def assert_healthy(cache: HFCache) -> None:
    """The hub's own view: no scan warning, offline resolution, bit-exact tensors."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    report = doctor.verify_cache(cache.repo_id, cache_dir=cache.cache_dir, check_hash=True)
    assert report.loadable and report.problems == (), report.problems
    assert all(os.path.islink(cache.path(f.name)) for f in report.files)
    assert scan_cache_dir(cache.cache_dir).warnings == []
    folder = snapshot_download(cache.repo_id, cache_dir=cache.cache_dir, local_files_only=True)
    assert os.path.realpath(folder) == os.path.realpath(cache.snapshot_dir)
    _, expected = tiny_safetensors()
    got = load_file(os.path.join(folder, MODEL))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# --- a healthy cache ---------------------------------------------------------------------------

def test_healthy_cache_verifies_ok_through_api_and_cli(cache, capsys):
    assert_healthy(cache)
    report = doctor.verify_cache(cache.repo_id, cache_dir=cache.cache_dir)
    assert report.commit == cache.commit and report.revision == "main"
    assert [(f.name, f.status, f.blob) for f in report.files] == [
        ("config.json", "ok", cache.blobs["config.json"]), (MODEL, "ok", cache.blobs[MODEL])]
    assert [(r.name, r.status) for r in report.refs] == [("main", "ok")]
    code, out = verify_cli(capsys, cache, "--hash")
    assert code == 0 and "loadable: yes (2 files)" in out
    assert repair_cache(cache.repo_id, cache_dir=cache.cache_dir, chmod=True) == []
    assert repair_cli(capsys, cache) == (0, "nothing to repair\n")


def test_snapshot_path_source_and_json(cache, capsys):
    code, out = run_cli(capsys, "cache", "verify", cache.snapshot_dir, "--json")
    data = json.loads(out)
    assert code == 0 and data["loadable"] is True and data["commit"] == cache.commit
    assert data["revision"] is None and data["repo_id"] == cache.repo_id
    assert {f["name"]: f["status"] for f in data["files"]} == {"config.json": "ok", MODEL: "ok"}
    sub = os.path.join(cache.snapshot_dir, "nested")
    os.makedirs(sub)
    assert doctor.verify_cache(sub).commit == cache.commit  # a folder inside a snapshot
    assert doctor.verify_cache(cache.path(MODEL)).commit == cache.commit  # a file of a snapshot


def test_default_cache_dir_comes_from_hf_hub_cache(cache):
    env = dict(os.environ, HF_HUB_CACHE=cache.cache_dir, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "weightcast.launch.cli", "cache", "verify", cache.repo_id, "--json"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["repo_dir"] == cache.repo_dir


def test_unknown_repo_and_plain_dir_are_clear_errors(cache, tmp_path, capsys):
    code, out = run_cli(capsys, "cache", "verify", "acme/absent", "--cache-dir", cache.cache_dir)
    assert code == 2 and "'acme/absent' is not in the Hugging Face cache" in out and "hf download" in out
    assert "Traceback" not in out
    with pytest.raises(CheckpointNotFoundError):
        doctor.verify_cache("acme/absent", cache_dir=cache.cache_dir)
    with pytest.raises(CacheError, match="Not a Hugging Face cache"):
        doctor.verify_cache(str(tmp_path))


# --- plain copies ------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_blob", [False, True], ids=["blob-gone", "blob-kept"])
def test_plain_copy_is_loadable_and_repaired_into_blob_and_link(cache, capsys, keep_blob):
    make_plain_copy(cache, MODEL, keep_blob=keep_blob)
    make_plain_copy(cache, "config.json", keep_blob=keep_blob)
    assert statuses(cache) == {"config.json": "plain-copy", MODEL: "plain-copy"}
    code, out = verify_cli(capsys, cache)
    assert code == 0 and "plain-copy" in out and "2 with warnings" in out
    code, out = repair_cli(capsys, cache)
    verb = "linked" if keep_blob else "moved"
    assert code == 0 and out.count(verb) == 2, out
    # the blob ids are the hub's: sha256 for the LFS file, git blob sha1 for config.json
    files = default_files()
    assert os.readlink(cache.path(MODEL)) == f"../../blobs/{sha256_hex(files[MODEL])}"
    assert os.readlink(cache.path("config.json")) == f"../../blobs/{git_blob_sha1(files['config.json'])}"
    assert os.stat(cache.blob_path(MODEL)).st_nlink == 1  # no second copy left behind
    assert_healthy(cache)
    assert repair_cli(capsys, cache) == (0, "nothing to repair\n")  # idempotent


def test_plain_copy_in_a_subfolder_gets_a_deeper_relative_link(tmp_path):
    extra = b'{"a": 1}'
    files = dict(default_files(), **{"sub/extra.json": extra})
    cache = build_hf_cache(str(tmp_path / "hub"), files=files)
    make_plain_copy(cache, "sub/extra.json")
    assert statuses(cache)["sub/extra.json"] == "plain-copy"
    repair_cache(cache.repo_id, cache_dir=cache.cache_dir)
    assert os.readlink(cache.path("sub/extra.json")) == f"../../../blobs/{git_blob_sha1(extra)}"
    from huggingface_hub import hf_hub_download
    path = hf_hub_download(cache.repo_id, "sub/extra.json", cache_dir=cache.cache_dir, local_files_only=True)
    assert open(path, "rb").read() == extra
    assert_healthy(cache)


def test_plain_copy_is_kept_when_a_blob_of_that_name_holds_other_bytes(cache):
    make_plain_copy(cache, MODEL, keep_blob=True)
    corrupt_blob(cache, MODEL)
    before = tree_state(cache.repo_dir)
    actions = repair_cache(cache.repo_id, cache_dir=cache.cache_dir)
    assert actions == [f"not changed: {MODEL}: blobs/{cache.blobs[MODEL]} exists with other content "
                       f"(see `verify --hash`)"]
    assert tree_state(cache.repo_dir) == before


# --- dangling links ----------------------------------------------------------------------------

def test_dangling_link_blocks_and_names_the_fetch_command(cache, capsys):
    from huggingface_hub import hf_hub_download, scan_cache_dir
    from huggingface_hub.errors import LocalEntryNotFoundError

    make_dangling(cache, MODEL)
    with pytest.raises(LocalEntryNotFoundError):  # what the hub says on its own
        hf_hub_download(cache.repo_id, MODEL, cache_dir=cache.cache_dir, local_files_only=True)
    assert len(scan_cache_dir(cache.cache_dir).warnings) == 1
    assert statuses(cache)[MODEL] == "dangling-link"
    code, out = verify_cli(capsys, cache)
    assert code == 2 and f"{MODEL}: dangling-link" in out and "loadable: no" in out
    before = tree_state(cache.repo_dir)
    code, out = repair_cli(capsys, cache)
    command = (f"hf download {cache.repo_id} {MODEL} --revision {cache.commit} --cache-dir "
               f"{cache.cache_dir} --force-download")
    assert code == 2 and out.startswith(f"cannot repair offline: {MODEL}") and command in out
    assert tree_state(cache.repo_dir) == before
    with pytest.raises(CacheError, match="dangling symlink") as err:
        doctor.check_snapshot_files(cache.snapshot_dir, [MODEL])
    assert f"weightcast cache verify {cache.snapshot_dir}" in str(err.value)


def test_absolute_link_from_another_machine_is_relinked_to_the_local_blob(cache, capsys):
    make_absolute_link(cache, MODEL, "/home/someone-else/.cache/huggingface/hub")
    assert statuses(cache)[MODEL] == "dangling-link"
    code, out = repair_cli(capsys, cache)
    assert code == 0 and f"relinked {MODEL} -> blobs/{cache.blobs[MODEL]} (it was dangling-link)" in out
    assert_healthy(cache)


# --- links turned into text files --------------------------------------------------------------

def test_link_turned_into_text_fails_with_a_cache_error_not_a_parse_error(cache, capsys):
    make_text_link(cache, MODEL)
    report = doctor.verify_cache(cache.repo_id, cache_dir=cache.cache_dir)
    status = {f.name: f for f in report.files}[MODEL]
    assert status.status == "link-turned-into-text" and status.blob == cache.blobs[MODEL]
    assert not report.loadable
    with pytest.raises(CacheError) as err:
        doctor.check_snapshot_files(cache.snapshot_dir, ["config.json", MODEL])
    msg = str(err.value)
    assert MODEL in msg and "symlink turned into a text file" in msg and "weightcast cache verify" in msg
    code, out = verify_cli(capsys, cache)
    assert code == 2 and "link-turned-into-text" in out
    code, out = repair_cli(capsys, cache)
    assert code == 0 and f"relinked {MODEL}" in out
    assert_healthy(cache)


def test_text_file_whose_blob_is_gone_needs_a_forced_download(cache, capsys):
    make_text_link(cache, MODEL, drop_blob=True)
    code, out = repair_cli(capsys, cache, "--dry-run")
    assert code == 2 and "cannot repair offline" in out and "--force-download" in out


def test_lfs_pointer_is_reported_and_refused_by_the_loader_check(cache):
    os.unlink(cache.path(MODEL))
    with open(cache.path(MODEL), "w") as f:
        f.write(f"version https://git-lfs.github.com/spec/v1\noid sha256:{cache.blobs[MODEL]}\nsize 776\n")
    assert statuses(cache)[MODEL] == "lfs-pointer"
    with pytest.raises(CacheError, match="Git LFS pointer"):
        doctor.check_snapshot_files(cache.snapshot_dir, [MODEL])


# --- blobs whose content does not match their name ---------------------------------------------

@pytest.mark.parametrize("name", [MODEL, "config.json"], ids=["sha256", "git-sha1"])
def test_hash_mismatch_found_only_with_hash(cache, capsys, name):
    corrupt_blob(cache, name)
    assert statuses(cache)[name] == "ok"  # not re-hashed by default
    assert statuses(cache, check_hash=True)[name] == "hash-mismatch"
    code, out = verify_cli(capsys, cache, "--hash")
    assert code == 2 and f"{name}: hash-mismatch" in out and f"blob {cache.blobs[name]} does not match" in out
    assert verify_cli(capsys, cache)[0] == 0
    code, out = repair_cli(capsys, cache)
    assert code == 0 and out == "nothing to repair\n"  # repair does not hash: it trusts names
    actions = repair(doctor.verify_cache(cache.repo_id, cache_dir=cache.cache_dir, check_hash=True))
    assert len(actions) == 1 and actions[0].startswith("cannot repair offline") and "--force-download" in actions[0]
    assert os.path.exists(cache.blob_path(name))  # never deleted


# --- modes -------------------------------------------------------------------------------------

def test_unreadable_by_others_is_a_warning_fixed_by_chmod(cache, capsys):
    os.chmod(cache.blob_path(MODEL), 0o600)  # what safetensors 0.8 writes
    os.chmod(os.path.join(cache.repo_dir, "snapshots"), 0o700)
    report = doctor.verify_cache(cache.repo_id, cache_dir=cache.cache_dir)
    assert {f.name: f.status for f in report.files} == {"config.json": "unreadable-by-others",
                                                       MODEL: "unreadable-by-others"}
    assert report.loadable and all(p.startswith("warning: ") for p in report.problems)
    code, out = verify_cli(capsys, cache)
    assert code == 0 and "mode 700" in out and "mode 600" in out
    code, out = repair_cli(capsys, cache)
    assert code == 0 and "rerun with --chmod" in out
    assert os.stat(cache.blob_path(MODEL)).st_mode & 0o777 == 0o600
    code, out = repair_cli(capsys, cache, "--chmod")
    assert code == 0 and "chmod 600 -> 644" in out and "chmod 700 -> 755" in out
    assert os.stat(cache.blob_path(MODEL)).st_mode & 0o777 == 0o644
    assert_healthy(cache)
    assert repair_cli(capsys, cache, "--chmod") == (0, "nothing to repair\n")


def test_unreadable_by_this_user_blocks():
    """Run as an ordinary user (under root: a throw-away one, see tests/unprivileged.py)."""
    with unprivileged.shared_tmpdir() as top:
        cache = build_hf_cache(os.path.join(top, "hub"))
        os.chmod(cache.blob_path(MODEL), 0o000)

        def check() -> tuple[int, dict[str, str], str]:
            with pytest.raises(CacheError, match="cannot read") as exc:
                doctor.check_snapshot_files(cache.snapshot_dir, [MODEL])
            return os.geteuid(), statuses(cache), str(exc.value)

        uid, found, message = unprivileged.as_unprivileged(check)
    assert uid != 0
    assert found[MODEL] == "unreadable" and found["config.json"] == "ok", found
    assert MODEL in message and "Fix:" in message, message


# --- refs --------------------------------------------------------------------------------------

def test_ref_with_trailing_newline_blocks_main_and_is_stripped(cache, capsys):
    from huggingface_hub import scan_cache_dir, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    write_ref(cache, "main", cache.commit + "\n")
    with pytest.raises(LocalEntryNotFoundError):  # the hub's own behaviour
        snapshot_download(cache.repo_id, cache_dir=cache.cache_dir, local_files_only=True)
    assert len(scan_cache_dir(cache.cache_dir).warnings) == 1
    code, out = verify_cli(capsys, cache)
    assert code == 2 and "refs/main: trailing-whitespace" in out
    assert verify_cli(capsys, cache, "--revision", cache.commit)[0] == 0  # a pinned commit still loads
    code, out = repair_cli(capsys, cache)
    assert code == 0 and f"stripped the whitespace from refs/main ({cache.commit})" in out
    assert open(os.path.join(cache.repo_dir, "refs", "main")).read() == cache.commit
    assert_healthy(cache)


def test_ref_to_a_commit_without_snapshot(cache, capsys):
    from huggingface_hub import scan_cache_dir

    other = "f" * 40
    write_ref(cache, "main", other)
    assert len(scan_cache_dir(cache.cache_dir).warnings) == 1
    report = doctor.verify_cache(cache.repo_id, cache_dir=cache.cache_dir)
    assert not report.loadable and report.refs[0].status == "missing-snapshot"
    code, out = verify_cli(capsys, cache)
    assert code == 2 and f"snapshots/{other}: missing" in out
    code, out = repair_cli(capsys, cache)
    assert code == 2 and f"hf download {cache.repo_id} --revision {other}" in out


def test_a_ref_that_does_not_exist(cache, capsys):
    code, out = verify_cli(capsys, cache, "--revision", "v2")
    assert code == 2 and "refs/v2: missing: no such ref" in out and cache.commit in out


# --- dry run, and everything at once -----------------------------------------------------------

def test_dry_run_changes_nothing_then_repair_fixes_everything(cache, capsys):
    make_plain_copy(cache, MODEL)
    make_text_link(cache, "config.json")
    write_ref(cache, "main", cache.commit + "\n")
    os.chmod(cache.path(MODEL), 0o600)
    before = tree_state(cache.cache_dir)
    code, out = repair_cli(capsys, cache, "--chmod", "--dry-run")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and all(line.startswith("would ") for line in lines), out
    assert tree_state(cache.cache_dir) == before
    code, out = repair_cli(capsys, cache, "--chmod")
    assert code == 0 and len(out.splitlines()) == 4
    assert_healthy(cache)


# --- the loader's pre-parse check ---------------------------------------------------------------

def test_check_snapshot_files_refuses_tiny_files_and_passes_real_ones(cache, tmp_path):
    doctor.check_snapshot_files(cache.snapshot_dir, ["config.json", MODEL])
    (tmp_path / "m.safetensors").write_bytes(b"abc")
    with pytest.raises(CacheError, match="too small to be a safetensors file") as err:
        doctor.check_snapshot_files(str(tmp_path), ["m.safetensors"])
    assert "Got: 3 bytes" in str(err.value) and "copy the checkpoint again" in str(err.value)
    with pytest.raises(CheckpointNotFoundError, match="absent.safetensors is missing"):
        doctor.check_snapshot_files(cache.snapshot_dir, ["absent.safetensors"])


# --- node-local caches --------------------------------------------------------------------------

def test_compare_snapshots_names_the_node_that_differs(cache):
    facts = doctor.snapshot_facts(cache.snapshot_dir, [MODEL], node=0)
    assert facts == {"node": 0, "commit": cache.commit, "files": {MODEL: len(default_files()[MODEL])}}
    same = [dict(facts, node=n) for n in range(3)]
    doctor.compare_snapshots(same)
    doctor.compare_snapshots(same[:1])
    other = dict(facts, node=2, commit="e" * 40)
    with pytest.raises(CacheError, match=r"Node 2 holds a different checkpoint snapshot than node 0") as err:
        doctor.compare_snapshots([same[0], same[1], other])
    assert f"commit {'e' * 40} where node 0 has {cache.commit}" in str(err.value)
    short = dict(facts, node=0, files={MODEL: 10})
    with pytest.raises(CacheError, match="Node 0 holds") as err:  # the majority wins
        doctor.compare_snapshots([short, same[1], same[2]])
    assert f"{MODEL} is 10 bytes" in str(err.value)
    missing = dict(facts, node=1, files={})
    with pytest.raises(CacheError, match=f"{MODEL} missing"):
        doctor.compare_snapshots([same[0], missing])


# --- through load_pretrained --------------------------------------------------------------------

@pytest.mark.parametrize("defect", ["text", "dangling"])
def test_load_pretrained_on_a_broken_cache_names_the_file_and_the_next_step(cache, defect):
    from weightcast.workers.api import load_pretrained

    (make_text_link if defect == "text" else make_dangling)(cache, MODEL)
    with pytest.raises(CacheError) as err:
        load_pretrained(cache.repo_id, cache_dir=cache.cache_dir, model=None, progress=False, timeout=60)
    msg = str(err.value)
    assert MODEL in msg and f"weightcast cache verify {cache.snapshot_dir}" in msg
    assert "header" not in msg and "JSON" not in msg


def test_load_pretrained_after_repair_is_bit_exact(cache):
    from weightcast.workers.api import load_pretrained

    make_plain_copy(cache, MODEL)
    make_text_link(cache, "config.json")
    write_ref(cache, "main", cache.commit + "\n")
    repair_cache(cache.repo_id, cache_dir=cache.cache_dir)
    state = load_pretrained(cache.repo_id, cache_dir=cache.cache_dir, model=None, progress=False, timeout=60)
    _, expected = tiny_safetensors()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def test_a_cache_copied_with_cp_rL_is_repaired_to_one_copy_per_blob(cache, tmp_path, capsys):
    import shutil

    moved = HFCache(str(tmp_path / "cluster-hub"), cache.repo_id,
                    str(tmp_path / "cluster-hub" / os.path.basename(cache.repo_dir)), cache.commit, cache.blobs)
    shutil.copytree(cache.cache_dir, moved.cache_dir, symlinks=False)  # what `cp -rL` / `scp -r` do
    assert set(statuses(moved).values()) == {"plain-copy"}
    code, out = repair_cli(capsys, moved)
    assert code == 0 and out.count("linked") == 2 and "identical" in out
    assert_healthy(moved)


@pytest.mark.parametrize("command", ["inspect", "plan"])
def test_inspect_and_plan_on_a_broken_cache_name_the_file_and_the_next_step(cache, command, capsys):
    from weightcast.launch.cli import main

    make_text_link(cache, MODEL)
    argv = [command, cache.snapshot_dir] + (["--nodes", "1", "--cpus-per-node", "2"] if command == "plan" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert MODEL in err and "weightcast cache verify" in err
    assert "header" not in err.lower() and "Traceback" not in err
