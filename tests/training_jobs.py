"""Rank functions for the training tests (run in local ranks through launch.local.spawn)."""
from __future__ import annotations

import torch
import torch.distributed as dist

IDS = [[3, 17, 42, 99, 7, 120, 1, 64, 5, 9]]


def _mesh(nodes: int):
    from torch.distributed.device_mesh import init_device_mesh
    world = dist.get_world_size()
    if nodes == 1:
        return init_device_mesh("cpu", (world,))
    return init_device_mesh("cpu", (nodes, world // nodes), mesh_dim_names=("replicate", "shard"))


def reference_fsdp(source: str, nodes: int = 1) -> torch.nn.Module:
    """FSDP2 as its documentation starts it from a pretrained checkpoint: every rank builds the
    model, wraps each decoder layer and the root with ``fully_shard``, and rank 0's full state dict
    is broadcast with ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    full = model.state_dict() if dist.get_rank() == 0 else {}
    full = {k: v.clone() for k, v in full.items()}
    mesh = _mesh(nodes)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """One forward/backward/optimizer step on fixed ids; returns the loss."""
    ids = torch.tensor(IDS)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def _locals(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def fsdp_start(args: dict) -> dict:
    """Load with device_map="fsdp", compare layout, a training step and its AdamW update with the
    reference FSDP2 job (bit for bit), and report storage bytes."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as TShard
    from weightcast.workers.api import load_pretrained
    model, report = load_pretrained(args["source"], device_map="fsdp", return_report=True, timeout=60,
                                    transport=args.get("transport", "auto"))
    ref = reference_fsdp(args["source"], args.get("nodes", 1))
    rank = dist.get_rank()
    world = model.device_mesh.size(model.device_mesh.ndim - 1)
    shard_rank = model.device_mesh.get_local_rank(model.device_mesh.ndim - 1)
    layout = {}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        full_rows = p.shape[0]
        chunk = torch.chunk(torch.empty(full_rows), world)
        rows = chunk[shard_rank].shape[0] if shard_rank < len(chunk) else 0
        layout[name] = {"dtensor": isinstance(p, DTensor), "placements": [str(x) for x in p.placements],
                        "shape": list(p.shape), "local_rows": p.to_local().shape[0], "chunk_rows": rows,
                        "ref_local_equal": bool(torch.equal(p.to_local(), q.to_local())),
                        "ref_placements": [str(x) for x in q.placements]}
    assert all(isinstance(x, TShard) for p in model.parameters() for x in p.placements[-1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    losses = [(train_step(model, opt), train_step(ref, ref_opt)) for _ in range(2)]
    after = _locals(model)
    ref_after = _locals(ref)
    return {"layout": layout, "losses": losses,
            "step_equal": all(torch.equal(after[n], ref_after[n]) for n in after),
            "max_diff": max(float((after[n] - ref_after[n]).abs().max()) if after[n].numel() else 0.0
                            for n in after),
            "read_bytes": report["ranks"][rank]["read_bytes"], "total_read": report["total_read_bytes"],
            "checkpoint_bytes": report["checkpoint_bytes"],
            "meta": [n for n, p in model.named_parameters() if p.to_local().is_meta],
            "mesh": model.device_mesh.mesh.tolist()}


class TinyRows(torch.nn.Module):
    """Blocks of Linear(8, 8) and a 1-row head: on 2 ranks ``fully_shard`` leaves rank 1 no row of
    the head (torch.chunk gives one chunk)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(x)


def fsdp_empty_rows(args: dict) -> dict:
    """A model with a 1-row tensor: the rank fully_shard leaves empty holds an empty local shard,
    and a step equals the reference FSDP2 job bit for bit."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from weightcast.workers.api import load_pretrained
    model = load_pretrained(args["source"], model=TinyRows, device_map="fsdp", timeout=60)
    ref = TinyRows()
    for b in ref.blocks:
        fully_shard(b)
    fully_shard(ref)
    full = load_file(args["source"] + "/model.safetensors") if dist.get_rank() == 0 else {}
    set_model_state_dict(ref, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    x = torch.arange(24, dtype=torch.float32).reshape(3, 8) / 10
    losses = []
    for m in (model, ref):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        loss = m(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    local = _locals(model)
    ref_local = _locals(ref)
    return {"losses": losses, "shapes": {n: list(t.shape) for n, t in local.items()},
            "equal": all(torch.equal(local[n], ref_local[n]) for n in local)}


# ---------------------------------------------------------------- resuming a Trainer checkpoint

def trainer_groups(model: torch.nn.Module) -> list[dict]:
    """The param groups transformers' Trainer builds (decay / no decay, in named_parameters order)."""
    from transformers.trainer_pt_utils import get_parameter_names
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = get_parameter_names(model, [torch.nn.LayerNorm], patterns)
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n in decay], "weight_decay": 0.0},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def _optimizer_and_scheduler(model: torch.nn.Module):
    from transformers import get_scheduler
    opt = torch.optim.AdamW(trainer_groups(model), lr=1e-2)
    return opt, get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=3)


def _rng_equal(path: str) -> dict:
    import random

    import numpy as np
    from weightcast.workers.training_files import torch_load_small
    saved = torch_load_small(path)
    np_now, np_saved = np.random.get_state(), saved["numpy"]
    return {"cpu": bool(torch.equal(torch.get_rng_state(), saved["cpu"])),
            "python": random.getstate() == saved["python"],
            "numpy": all((a == b).all() if hasattr(a, "shape") else a == b for a, b in zip(np_now, np_saved))}


def ddp_resume(args: dict) -> dict:
    """weightcast resumes the Trainer checkpoint; every tensor compared with torch.load of the files."""
    import os

    from safetensors.torch import load_file
    from tests.trainer_run import tiny_model
    from weightcast.workers.training_state import load_training_state
    ckpt, rank = args["checkpoint"], dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    model = tiny_model()
    opt, sched = _optimizer_and_scheduler(model)
    trainer_state, report = load_training_state(ckpt, model, opt, sched, return_report=True, timeout=60,
                                                transport=args.get("transport", "auto"))
    saved_opt = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    mine = opt.state_dict()
    state_equal = all(torch.equal(mine["state"][i][k], v) and mine["state"][i][k].dtype == v.dtype
                      for i, st in saved_opt["state"].items() for k, v in st.items())
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    sd = model.state_dict()
    return {"weights_equal": all(torch.equal(sd[k], v) for k, v in weights.items()),
            "opt_state_equal": state_equal and len(mine["state"]) == len(saved_opt["state"]),
            "param_groups_equal": mine["param_groups"] == saved_opt["param_groups"],
            "scheduler_equal": sched.state_dict() == torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=True),
            "rng": _rng_equal(os.path.join(ckpt, f"rng_state_{rank}.pth")),
            "global_step": trainer_state.get("global_step"),
            "optimizer_report": report["optimizer"], "weights_read": report["weights"]["total_read_bytes"],
            "weights_bytes": report["weights"]["checkpoint_bytes"]}


def _reference_fsdp_resume(ckpt: str):
    """The documented FSDP2 resume: full model and optimizer state on rank 0, broadcast with
    set_model_state_dict / set_optimizer_state_dict(full_state_dict=True, broadcast_from_rank0=True)."""
    import os

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    model = reference_fsdp(ckpt)
    opt, _ = _optimizer_and_scheduler(model)
    names = {id(p): n for n, p in model.named_parameters()}
    full: dict = {}
    if dist.get_rank() == 0:
        saved = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        full = {"state": {order[i]: st for i, st in saved["state"].items()},
                "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
    return model, opt


def fsdp_resume(args: dict) -> dict:
    """device_map="fsdp" + load_training_state of the Trainer checkpoint: each rank's optimizer state
    is the Shard(0) slice of the saved one; a step equals the broadcast_from_rank0 reference."""
    import os

    from weightcast.workers.api import load_pretrained
    from weightcast.workers.training_state import load_training_state
    ckpt = args["checkpoint"]
    model = load_pretrained(ckpt, device_map="fsdp", timeout=60)
    rank = dist.get_rank()
    opt, sched = _optimizer_and_scheduler(model)
    _, report = load_training_state(ckpt, model, opt, sched, return_report=True, timeout=60)
    saved = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    mine = opt.state_dict()["state"]
    slices_equal = True
    for i, st in saved["state"].items():
        for k, v in st.items():
            got = mine[i][k]
            want = torch.chunk(v, dist.get_world_size())[rank] if v.dim() else v
            got = got.to_local() if hasattr(got, "to_local") else got
            slices_equal &= bool(torch.equal(got, want))
    ref, ref_opt = _reference_fsdp_resume(ckpt)
    losses = [(train_step(model, opt), train_step(ref, ref_opt)) for _ in range(2)]
    after, ref_after = _locals(model), _locals(ref)
    return {"slices_equal": slices_equal, "losses": losses,
            "max_diff": max(float((after[n] - ref_after[n]).abs().max()) if after[n].numel() else 0.0
                            for n in after),
            "optimizer_report": report["optimizer"]}


def resume_or_error(args: dict) -> dict:
    """load_training_state on a possibly broken checkpoint: the error class and message, and whether
    model, optimizer, scheduler and RNG are untouched (or, when it succeeds, equal to the files)."""
    import os

    from safetensors.torch import load_file
    from tests.trainer_run import tiny_model
    from weightcast.orchestrator.errors import WeightcastError
    from weightcast.workers.training_state import load_training_state
    model = tiny_model()
    opt, sched = _optimizer_and_scheduler(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    sched_before = sched.state_dict()
    out: dict = {"error": None}
    try:
        load_training_state(args["checkpoint"], model, opt, sched, rng=args.get("rng", "restore"), timeout=60)
    except WeightcastError as exc:
        out.update(error=type(exc).__name__, message=str(exc))
        out["untouched"] = (all(torch.equal(before[k], v) for k, v in model.state_dict().items())
                            and not opt.state and sched.state_dict() == sched_before
                            and torch.equal(torch.get_rng_state(), rng_before))
        return out
    weights = load_file(os.path.join(args["checkpoint"], "model.safetensors"))
    out["weights_equal"] = all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    out["opt_steps"] = sorted({float(st["step"]) for st in opt.state.values()})
    out["rng_kept"] = bool(torch.equal(torch.get_rng_state(), rng_before))
    return out


def resume_and_save(args: dict) -> dict:
    """Resume the Trainer checkpoint (DDP or FSDP2), save it again with save_training_state; the
    caller compares the files. ``kill_rank`` dies (SIGKILL) while writing the optimizer file."""
    import os
    import signal

    from weightcast.workers.training_save import save_training_state
    from weightcast.workers.training_state import load_training_state
    ckpt = args["checkpoint"]
    if args.get("fsdp"):
        from weightcast.workers.api import load_pretrained
        model = load_pretrained(ckpt, device_map="fsdp", timeout=60)
    else:
        from tests.trainer_run import tiny_model
        model = tiny_model()
    opt, sched = _optimizer_and_scheduler(model)
    state = load_training_state(ckpt, model, opt, sched, timeout=60)
    kill = args.get("kill_rank")

    def hook(phase: str, rank: int) -> None:
        if phase == "optimizer" and rank == kill:
            os.kill(os.getpid(), signal.SIGKILL)
    save_training_state(args["out"], model, opt, sched, trainer_state=state, timeout=30, _fault_hook=hook)
    return {"ok": True}
