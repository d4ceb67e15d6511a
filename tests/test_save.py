"""Atomic distributed save: transformers-identical layout, bit-exact round trips (safetensors,
transformers, weightcast), modes, replacing a checkpoint, and faults (a rank killed or failing
at each step) that leave the previous checkpoint intact and no temporary directory behind."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import pytest
import torch

from tests.ranks import spawn  # forked ranks: see tests/ranks.py
from weightcast.orchestrator.errors import ConfigError, LoadError, PlanError
from weightcast.orchestrator.save_plan import Held, Manifest, merge_order, plan_save
from tests.ckpt_factory import sample_tensors, save_tiny_llama, write_sharded

pytestmark = pytest.mark.timeout(300)

SHARD = "100KB"


# ---------------------------------------------------------------- helpers (also run in ranks)

def read_checkpoint(root: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, with safetensors."""
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(root)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(root, f)))
    return out


def digest(root: str) -> dict[str, str]:
    """name -> sha256 of every file in ``root`` (to prove a directory did not change)."""
    return {f: hashlib.sha256(open(os.path.join(root, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(root))}


def leftovers(out: str) -> list[str]:
    parent, base = os.path.split(out)
    return sorted(n for n in os.listdir(parent) if n.startswith(base + "."))


def layout(root: str) -> tuple[list[str], dict]:
    files = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
    index = os.path.join(root, "model.safetensors.index.json")
    return files, (json.load(open(index)) if os.path.exists(index) else {})


def holding(name: str, t: torch.Tensor, i: int, rank: int, world: int, how: str):
    """What ``rank`` holds of tensor number ``i`` under layout ``how``: None, the tensor, or
    (slice tensor, (dim, start, stop, full_shape))."""
    if how == "replicate":
        return t
    kind = i % 4
    if kind == 0 and t.dim() >= 1 and t.shape[0] >= world:  # tensor parallel along dim 0
        dim = 0
    elif kind == 1 and t.dim() >= 2 and t.shape[1] >= world:  # along dim 1 (rowwise)
        dim = 1
    elif kind == 2:
        return t if rank == i % world else None  # one owner
    else:
        return t  # replicated
    n = t.shape[dim]
    start, stop = n * rank // world, n * (rank + 1) // world
    part = t.narrow(dim, start, stop - start)  # along dim 1: a non-contiguous view
    return part if dim else part.clone(), (dim, start, stop, tuple(t.shape))


def as_dtensors(full: dict, order: list[str], world: int) -> dict:
    """DTensors over a 1-D CPU mesh: sharded along dim 0, dim 1, or replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for i, name in enumerate(order):
        t = full[name]
        place = [Shard(0)] if i % 3 == 0 else [Shard(1)] if i % 3 == 1 and t.dim() == 2 else [Replicate()]
        out[name] = distribute_tensor(t, mesh, place)
    return out


def rank_save(args: dict) -> dict:
    """Rank function: hold part of ``args["ref"]`` per ``args["how"]`` and save it to
    ``args["out"]``; a fault is injected at ``args["fault_at"]`` on ``args["fault_rank"]``."""
    import torch.distributed as dist
    from datetime import timedelta
    from weightcast.workers import save
    from weightcast.workers.save import save_pretrained
    save.SEND_WINDOW = args.get("window", save.SEND_WINDOW)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=args["timeout"]))
    full = read_checkpoint(args["ref"])
    order = args["order"]
    state, owned = {}, {}
    if args["how"] == "dtensor":
        state = as_dtensors(full, order, world)
    for i, name in enumerate(order if args["how"] != "dtensor" else ()):
        held = holding(name, full[name], i, rank, world, args["how"])
        if isinstance(held, tuple):
            state[name], owned[name] = held
        elif held is not None:
            state[name] = held
    if args.get("bad_shape") == rank:
        state[order[3]] = torch.zeros(3, 3)  # a replicated tensor, with another shape than elsewhere

    def hook(event: str, detail: str) -> None:
        if rank == args.get("fault_rank") and event == args.get("fault_at"):
            if args.get("fault") == "raise":
                raise RuntimeError(f"injected fault at {event}")
            if args.get("fault") == "hang":  # stuck (alive) well past the others' bound, then gone
                hung = time.time()
                time.sleep(args["timeout"] + 10)
                with open(args["out"] + f".hung-{rank}", "w") as fh:
                    fh.write(json.dumps({"hung": hung, "woke": time.time()}))
                os._exit(3)
            with open(args["out"] + f".killed-{rank}", "w") as fh:
                fh.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
    config = json.load(open(os.path.join(args["ref"], "config.json"))) if args.get("config") else None
    t0 = time.time()
    try:
        save_pretrained(state, args["out"], max_shard_size=args["shard"], owned=owned or None,
                        order=order if args.get("hint", True) else None, config=config,
                        timeout=args["timeout"], _fault_hook=hook)
        result = {"ok": True}
    except LoadError as exc:
        result = {"ok": False, "error": str(exc), "t": time.time()}
    dist.destroy_process_group()
    return {**result, "rank": rank, "start": t0}


def llama_order(model) -> list[str]:
    """The names transformers saves, in its order (tied lm_head left out)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    return list(remove_tied_weights_from_state_dict(dict(model.state_dict()), model))


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[str, object]:
    """A tiny Llama saved by transformers' save_pretrained with small shards."""
    root = tmp_path_factory.mktemp("ref") / "llama"
    model = save_tiny_llama(root, tied=True, max_shard_size=SHARD)
    return str(root), model


# ---------------------------------------------------------------- the plan (pure)

def held(name: str, shape: tuple, dim=None, start=0, stop=0, dtype="float32") -> Held:
    return Held(name, dtype, 4, shape, dim, start, stop)


def test_merge_order_follows_the_rank_that_knows_everything() -> None:
    full = [f"t{i}" for i in range(6)]
    ms = [Manifest(0, (held("t0", (1,)), held("t4", (1,))), tuple(full)),
          Manifest(1, (held("t5", (1,)), held("t1", (1,)), held("t2", (1,)), held("t3", (1,))))]
    assert merge_order(ms) == full
    # another rank's own (file) order never overrides a hint; names no hint lists go last
    ms = [Manifest(0, (held("a", (1,)),), ("a", "b", "c", "d")),
          Manifest(1, (held("x", (1,)), held("d", (1,)), held("c", (1,)), held("b", (1,))))]
    assert merge_order(ms) == ["a", "b", "c", "d", "x"]
    # without any hint, each rank's own order is kept and rank 0 goes first
    ms = [Manifest(0, (held("a", (1,)), held("c", (1,)))), Manifest(1, (held("b", (1,)), held("c", (1,))))]
    assert merge_order(ms) == ["a", "b", "c"]


def test_shards_match_huggingface_split_on_random_sizes() -> None:
    from huggingface_hub import split_state_dict_into_shards_factory
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(1, 40, (1,), generator=g))
        sizes = [int(s) for s in torch.randint(1, 1000, (n,), generator=g)]
        names = [f"w{trial}.{i}" for i in range(n)]
        limit = int(torch.randint(50, 3000, (1,), generator=g))
        want = split_state_dict_into_shards_factory(dict(zip(names, sizes)), get_storage_size=lambda s: s,
                                                    max_shard_size=limit,
                                                    filename_pattern="model{suffix}.safetensors")
        ms = [Manifest(0, tuple(Held(nm, "uint8", 1, (s,)) for nm, s in zip(names, sizes)))]
        plan = plan_save(ms, limit, save_id="x", out="/o")
        assert {f.file: list(f.tensors) for f in plan.files} == want.filename_to_tensors
        assert plan.total_size == sum(sizes)


def test_plan_gathers_slices_to_the_writer_and_balances_writers() -> None:
    ms = [Manifest(r, (held("a", (4, 2), 0, 2 * r, 2 * r + 2), held("b", (1000,)), held("c", (1000,))))
          for r in range(2)]
    plan = plan_save(ms, 4100, save_id="x", out="/o")
    assert [f.writer for f in plan.files] == [0, 1]
    a = [p for p in plan.pieces if p.name == "a"]
    assert [(p.src, p.start, p.stop) for p in a] == [(0, 0, 2), (1, 2, 4)]
    assert [p.src for p in plan.pieces if p.name == "c"] == [1]  # the writer's own copy
    assert len({p.tag for p in plan.pieces}) == len(plan.pieces)


@pytest.mark.parametrize("bad, match", [
    ([held("a", (4,), 0, 0, 2), held("a", (4,), 0, 3, 4)], "gap"),
    ([held("a", (4,), 0, 0, 3), held("a", (4,), 0, 2, 4)], "overlap"),
    ([held("a", (4,), 0, 0, 2), held("a", (4,), 0, 2, 3)], "end of dim"),
    ([held("a", (4,)), held("a", (5,))], "disagree"),
    ([held("a", (4,)), held("a", (4,), dtype="bfloat16")], "disagree"),
])
def test_plan_refuses_inconsistent_holdings(bad: list, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        plan_save([Manifest(r, (h,)) for r, h in enumerate(bad)], "5GB", save_id="x", out="/o")


def test_plan_refuses_bad_sizes_and_nothing_to_save() -> None:
    with pytest.raises(ConfigError, match="max_shard_size"):
        plan_save([Manifest(0, (held("a", (1,)),))], "5 parsecs", save_id="x", out="/o")
    with pytest.raises(ConfigError, match="Nothing to save"):
        plan_save([Manifest(0, ())], "5GB", save_id="x", out="/o")


# ---------------------------------------------------------------- one process

def logits(model) -> torch.Tensor:
    ids = torch.arange(12).reshape(1, 12) % 256
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("made", ["fresh-tied", "fresh-untied", "from_pretrained"])
def test_module_save_matches_transformers(ref, tmp_path, made: str) -> None:
    """A model made from scratch (state-dict order) or loaded with from_pretrained (natural
    name order, as transformers re-saves it): the same files, weight map and tensors."""
    from transformers import AutoModelForCausalLM
    from weightcast.workers.save import save_pretrained
    want = tmp_path / "hf"
    tied = made != "fresh-untied"
    if made == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(ref[0])
        model.save_pretrained(want, max_shard_size="150KB")
    else:
        model = save_tiny_llama(want, tied=tied, max_shard_size="150KB")
    out = tmp_path / "ours"
    save_pretrained(model, out, max_shard_size="150KB")
    assert layout(out) == layout(want) and len(layout(out)[0]) > 1
    ours, theirs = read_checkpoint(out), read_checkpoint(want)
    assert ours.keys() == theirs.keys() and ("lm_head.weight" in ours) is not tied
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k])
    for f in os.listdir(out):
        assert os.stat(out / f).st_mode & 0o777 == 0o644
    assert os.stat(out).st_mode & 0o777 == 0o755
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(again), logits(model))


def test_natural_order_is_transformers_order() -> None:
    from transformers.core_model_loading import dot_natural_key
    from weightcast.orchestrator.save_plan import natural_key
    names = ["m.layers.10.w", "m.layers.2.w", "m.shard_11", "m.shard_2", "b", "m.0", "m.x1y", "lm_head.weight",
             "m.layers.2.mlp.experts.10.w", "m.layers.2.mlp.experts.9.w", "m.norm.weight", "m.embed.weight"]
    assert sorted(names, key=natural_key) == sorted(names, key=dot_natural_key)


def test_single_file_and_plain_dict_with_ties(tmp_path) -> None:
    from safetensors.torch import load_file
    from weightcast.workers.save import save_pretrained
    tensors = sample_tensors()
    tensors["alias"] = tensors["embed.weight"]  # the same view twice: saved once
    tensors["rows"] = tensors["layers.0.attn.q.weight"][2:5]  # a view into a bigger storage
    save_pretrained(tensors, tmp_path / "out", config={"model_type": "x", "dtype": torch.bfloat16})
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert "alias" not in got and got.keys() == tensors.keys() - {"alias"}
    for k, v in got.items():
        assert v.dtype == tensors[k].dtype and torch.equal(v, tensors[k])
    assert json.load(open(tmp_path / "out" / "config.json")) == {"model_type": "x", "dtype": "bfloat16"}


def test_replacing_keeps_other_files_and_drops_stale_shards(tmp_path) -> None:
    from weightcast.workers.save import save_pretrained
    out = tmp_path / "ckpt"
    write_sharded(out, shards=4)
    (out / "tokenizer.json").write_text("{}")
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("keep me")
    new = sample_tensors(seed=5)
    save_pretrained(new, out, max_shard_size=200)
    files, index = layout(out)
    assert files == [f"model-0000{i}-of-0000{len(files)}.safetensors" for i in range(1, len(files) + 1)]
    assert len(files) != 4 and set(index["weight_map"].values()) == set(files)
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "extra" / "notes.txt").read_text() == "keep me"
    got = read_checkpoint(out)
    assert got.keys() == new.keys() and all(torch.equal(got[k], new[k]) for k in new)
    assert leftovers(str(out)) == []


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("at", ["collected", "planned", "wrote", "written", "commit", "parked", "exchanged"])
def test_single_process_fault_leaves_a_complete_checkpoint(tmp_path, monkeypatch, exchange: bool, at: str) -> None:
    """A failure at any step (on systems with and without the atomic exchange) leaves the old
    checkpoint complete at the target (the new one once it was swapped in), nothing beside it."""
    from weightcast.workers import save_fs
    from weightcast.workers.save import save_pretrained
    if not exchange:
        monkeypatch.setattr(save_fs, "_exchange", lambda a, b: False)
    out = tmp_path / "ckpt"
    write_sharded(out, shards=3)
    before = digest(out)
    new = sample_tensors(seed=2)

    def hook(event: str, detail: str) -> None:
        if event == at:
            raise OSError(f"injected at {event}")
    fires = at != ("parked" if exchange else "exchanged")
    if fires:
        with pytest.raises(OSError, match="injected"):
            save_pretrained(new, out, max_shard_size=300, _fault_hook=hook)
    else:
        save_pretrained(new, out, max_shard_size=300, _fault_hook=hook)
    if fires and at != "exchanged":
        assert digest(out) == before
    else:
        got = read_checkpoint(out)
        assert got.keys() == new.keys() and all(torch.equal(got[k], new[k]) for k in new)
    assert leftovers(str(out)) == []


# ---------------------------------------------------------------- several ranks (gloo)

def save_args(ref_root: str, order: list[str], out: str, **kw) -> dict:
    return {"ref": ref_root, "order": order, "out": out, "shard": SHARD, "timeout": 20, "how": "mixed",
            "config": True, **kw}


@pytest.mark.parametrize("world, how, hint", [(3, "mixed", True), (2, "replicate", False), (3, "dtensor", True)])
def test_distributed_round_trip_matches_transformers(ref, tmp_path, monkeypatch, world: int, how: str,
                                                     hint: bool) -> None:
    """Tensor-parallel slices (dim 0 and 1), single owners and replicas, saved by several
    ranks (sends drained after every file): the same files and weight map as transformers,
    identical tensors and logits with safetensors, transformers and weightcast."""
    from transformers import AutoModelForCausalLM
    root, model = ref
    out = str(tmp_path / "out")
    results = spawn(world, "tests.test_save:rank_save",
                    save_args(root, llama_order(model), out, how=how, hint=hint, window=1), timeout=120)
    assert all(r.value["ok"] for r in results), [r.value for r in results]
    assert layout(out) == layout(root)
    ours, theirs = read_checkpoint(out), read_checkpoint(root)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert all(os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o644 for f in os.listdir(out))
    assert leftovers(out) == []
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(again), logits(model))
    if how == "mixed":  # and with weightcast's own loader
        from weightcast.workers.api import load_pretrained
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
            monkeypatch.delenv(key, raising=False)
        got = load_pretrained(out, model=None)
        assert got.keys() == theirs.keys() and all(torch.equal(got[k], theirs[k]) for k in theirs)
        assert torch.equal(logits(load_pretrained(out)), logits(model))


@pytest.mark.parametrize("rank, at", [(1, "wrote"), (2, "written"), (0, "commit"), (0, "exchanged")])
def test_rank_killed_mid_save(ref, tmp_path, rank: int, at: str) -> None:
    """SIGKILL one rank at a step: the survivors raise LoadError within the timeout, remove
    the temporary directory, and the target holds a complete checkpoint: the previous one,
    or the new one once rank 0 swapped it in."""
    root, model = ref
    out = str(tmp_path / "ckpt")
    write_sharded(out, shards=3)
    before = digest(out)
    args = save_args(root, llama_order(model), out, fault_rank=rank, fault_at=at, timeout=10)
    t0 = time.time()
    results = spawn(3, "tests.test_save:rank_save", args, timeout=120, check=False, grace=30)
    assert results[rank].returncode == -signal.SIGKILL
    killed_at = float(open(out + f".killed-{rank}").read())
    os.remove(out + f".killed-{rank}")
    for r in results:
        if r.rank != rank:
            assert r.returncode == 0 and r.value["ok"] is False, r.stderr[-2000:]
            assert "stopped responding" in r.value["error"]
            assert r.value["t"] - killed_at < args["timeout"] + 5
            if at != "commit" or rank != 0:
                assert f"rank {rank}" in r.value["error"]
    assert time.time() - t0 < 100
    assert leftovers(out) == []
    if at == "exchanged":
        assert layout(out) == layout(root)
        assert read_checkpoint(out).keys() == read_checkpoint(root).keys()
    else:
        assert digest(out) == before
        assert read_checkpoint(out).keys() == sample_tensors().keys()


def test_rank_stuck_past_the_timeout(ref, tmp_path, record_property) -> None:
    """A rank that stays alive but stops (hung I/O) after writing a file: every other rank
    raises within ``timeout`` + 3 s of the save's start, named as still running, long before
    the stuck rank wakes (``timeout`` + 10 s); the target is untouched and the temporary
    directory removed."""
    root, model = ref
    out = str(tmp_path / "ckpt")
    write_sharded(out, shards=2)
    before = digest(out)
    args = save_args(root, llama_order(model), out, fault_rank=1, fault_at="wrote", fault="hang", timeout=5)
    results = spawn(3, "tests.test_save:rank_save", args, timeout=120, check=False, grace=30)
    assert results[1].returncode == 3
    hang = json.loads(open(out + ".hung-1").read())
    os.remove(out + ".hung-1")
    delays = [round(r.value["t"] - r.value["start"], 3) for r in (results[0], results[2])]
    record_property("start_to_error_s", delays)
    print(f"\nrank 1 stuck at 'wrote' (timeout={args['timeout']}): survivors' errors after {delays} s")
    for r in (results[0], results[2]):
        assert r.value["ok"] is False and "rank 1 did not finish in time (still running)" in r.value["error"]
        assert args["timeout"] - 1 <= r.value["t"] - r.value["start"] < args["timeout"] + 3, delays
        assert r.value["t"] < hang["woke"] - 5, (r.value["t"], hang)
    assert digest(out) == before and leftovers(out) == []


@pytest.mark.parametrize("at", ["collected", "wrote"])
def test_exception_on_one_rank_is_the_same_error_everywhere(ref, tmp_path, at: str) -> None:
    root, model = ref
    out = str(tmp_path / "ckpt")
    write_sharded(out, shards=2)
    before = digest(out)
    args = save_args(root, llama_order(model), out, fault_rank=2, fault_at=at, fault="raise")
    results = spawn(3, "tests.test_save:rank_save", args, timeout=120)
    errors = {r.value["error"] for r in results}
    assert len(errors) == 1 and all(not r.value["ok"] for r in results)
    error = errors.pop()
    assert "on rank 2" in error and f"injected fault at {at}" in error
    assert digest(out) == before and leftovers(out) == []


def test_ranks_disagreeing_about_a_tensor(ref, tmp_path) -> None:
    root, model = ref
    out = str(tmp_path / "new")
    results = spawn(2, "tests.test_save:rank_save", save_args(root, llama_order(model), out, bad_shape=1),
                    timeout=120)
    assert all("PlanError" in r.value["error"] and "disagree" in r.value["error"] for r in results)
    assert not os.path.exists(out) and leftovers(out) == []


# ---------------------------------------------------------------- the CLI

def test_cli_resaves_in_place_tensor_parallel_and_cast(ref, tmp_path, capsys) -> None:
    """``weightcast save SRC SRC``: loaded as tensor-parallel slices on 2 ranks, cast to bf16,
    re-sharded, swapped in over the files it was loaded from; transformers' layout for the
    same bf16 model, the other files of the directory kept."""
    import shutil
    from transformers import AutoModelForCausalLM
    from weightcast.launch.cli import main
    root, model = ref
    work = str(tmp_path / "ckpt")
    shutil.copytree(root, work)
    want = tmp_path / "hf"
    bf16 = AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16)
    bf16.save_pretrained(want, max_shard_size="150KB")
    assert main(["save", work, work, "--nproc", "2", "--device-map", "tp", "--max-shard-size", "150KB",
                 "--dtype", "bfloat16", "--timeout", "60"]) == 0
    assert "saved 20 tensors" in capsys.readouterr().out
    assert layout(work) == layout(want) and len(layout(work)[0]) > 1
    got = read_checkpoint(work)
    assert all(torch.equal(got[k], v) for k, v in read_checkpoint(want).items())
    assert json.load(open(os.path.join(work, "config.json")))["dtype"] == "bfloat16"
    assert os.path.exists(os.path.join(work, "generation_config.json")) and leftovers(work) == []
    assert all(os.stat(os.path.join(work, f)).st_mode & 0o777 == 0o644 for f in os.listdir(work))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(work)), logits(bf16))


def test_cli_errors_exit_2(tmp_path, capsys) -> None:
    from weightcast.launch.cli import main
    write_sharded(tmp_path / "src", shards=2)
    assert main(["save", str(tmp_path / "src"), str(tmp_path / "out"), "--max-shard-size", "lots"]) == 2
    assert "max_shard_size" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["save", str(tmp_path / "src"), str(tmp_path / "file"), "--nproc", "2", "--timeout", "30"]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "x"
