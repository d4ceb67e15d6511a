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
