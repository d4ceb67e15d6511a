"""The loaders compared, each called the way its users call it, on every rank of a torchrun job.

A loader is ``load(source, ctx) -> (result, extra)``: ``result`` is what a user gets (a model or
a state dict; the caller touches every page of it before stopping the clock), ``extra`` the
loader's own figures (``requested``: bytes it asked storage for on this rank, when it reports or
implies them). :data:`LOADERS` names them; :func:`prepare` imports what a loader needs before the
first trial (imports are start-up, not loading). Called by :mod:`benchmarks.rank` on every rank
(collective where the loader is).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True, slots=True)
class LoaderSpec:
    name: str
    label: str        # how tables name it
    placement: str    # replicate | tp | auto: what each rank ends up holding
    family: str       # weightcast | per-rank | peer
    requested: str    # "report" (its own counter), "rchar" (read syscalls), "tensors" (bytes it loaded),
                      # "device" (block-device reads: a loader reading with O_DIRECT)


LOADERS: dict[str, LoaderSpec] = {s.name: s for s in (
    LoaderSpec("from_pretrained", "transformers from_pretrained per rank", "replicate", "per-rank", "tensors"),
    LoaderSpec("mmap_touch", "floor: private mmap of the files, every page touched, no model", "replicate",
               "floor", "tensors"),
    LoaderSpec("load_file", "safetensors load_file per rank", "replicate", "per-rank", "tensors"),
    LoaderSpec("accelerate", "accelerate load_checkpoint_and_dispatch per rank", "replicate", "per-rank", "tensors"),
    LoaderSpec("fastsafetensors", "fastsafetensors (files per rank, broadcast)", "replicate", "peer", "rchar"),
    LoaderSpec("runai", "Run:ai streamer, distributed mode", "replicate", "peer", "device"),
    LoaderSpec("tp_auto", "transformers tp_plan=auto", "tp", "peer", "tensors"),
    LoaderSpec("fastsafetensors_tp", "fastsafetensors get_sharded (weightcast's tp dims)", "tp", "peer", "rchar"),
    LoaderSpec("wc_replicate_node-shared", "weightcast replicate, node-shared", "replicate", "weightcast", "report"),
    LoaderSpec("wc_replicate_collective", "weightcast replicate, collective", "replicate", "weightcast", "report"),
    LoaderSpec("wc_tp_node-shared", "weightcast tp, node-shared", "tp", "weightcast", "report"),
    LoaderSpec("wc_tp_collective", "weightcast tp, collective", "tp", "weightcast", "report"),
    LoaderSpec("wc_auto_node-shared", "weightcast auto (layers spread), node-shared", "auto", "weightcast", "report"),
    LoaderSpec("wc_auto_collective", "weightcast auto (layers spread), collective", "auto", "weightcast", "report"),
    LoaderSpec("gpu_load_file", "safetensors load_file(device=cuda) per rank", "replicate", "gpu", "tensors"),
    LoaderSpec("gpu_fastsafetensors", "fastsafetensors nogds to cuda", "replicate", "gpu", "rchar"),
    LoaderSpec("gpu_wc_replicate_collective", "weightcast replicate, collective (NCCL)", "replicate", "gpu", "report"),
)}


def model_class(source: str) -> Any:
    """The transformers class named by config.json's ``architectures`` (AutoModel otherwise)."""
    import transformers
    with open(os.path.join(source, "config.json")) as fh:
        archs = json.load(fh).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return cls or transformers.AutoModel


def prepare(name: str, source: str) -> None:
    """Import what ``name`` needs (not timed)."""
    import torch  # noqa: F401
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # its bars would interleave with the suite's
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    if "wc_" in name or name in ("from_pretrained", "tp_auto", "accelerate"):
        model_class(source)
        import accelerate  # noqa: F401
        import weightcast.workers.api  # noqa: F401
    if "fastsafetensors" in name:
        import fastsafetensors  # noqa: F401
    if name == "runai":
        import runai_model_streamer  # noqa: F401


def _tensor_bytes(state: dict) -> int:
    total = 0
    for t in state.values():
        if hasattr(t, "to_local"):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total


def load_from_pretrained(source: str, ctx: dict) -> tuple[Any, dict]:
    model = model_class(source).from_pretrained(source, dtype="auto")
    return model, {"requested": _unique_bytes(model)}


def load_mmap_touch(source: str, ctx: dict) -> tuple[Any, dict]:
    """The physical floor of a zero-copy replicate load on this machine: each file mapped
    privately (copy-on-write, as transformers maps it), nothing else; the caller touches it."""
    import torch
    from benchmarks.procfs import checkpoint_files
    maps = {}
    for path in checkpoint_files(source):
        size = os.path.getsize(path)
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
        maps[path] = torch.empty(0, dtype=torch.uint8).set_(storage)
    return maps, {"requested": sum(t.numel() for t in maps.values())}


def load_load_file(source: str, ctx: dict) -> tuple[Any, dict]:
    from safetensors.torch import load_file
    from benchmarks.procfs import checkpoint_files
    state: dict = {}
    for path in checkpoint_files(source):
        state.update(load_file(path))
    return state, {"requested": _tensor_bytes(state)}


def load_accelerate(source: str, ctx: dict) -> tuple[Any, dict]:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig
    cls = model_class(source)
    config = AutoConfig.from_pretrained(source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    model.tie_weights()  # accelerate's documented order: tie, then load (else lm_head stays on meta)
    model = load_checkpoint_and_dispatch(model, source, device_map={"": "cpu"})
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model, {"requested": _unique_bytes(model)}


def load_tp_auto(source: str, ctx: dict) -> tuple[Any, dict]:
    """``tp_plan="auto"``; a model with an expert-parallel plan also splits its experts over the
    ranks (``ep_size`` = world size), the layout weightcast's ``tp`` gives it."""
    from transformers.distributed import DistributedConfig
    cls = model_class(source)
    ep = int(os.environ.get("WORLD_SIZE", "1")) if getattr(cls.config_class, "base_model_ep_plan", None) else None
    config = DistributedConfig(tp_plan="auto", ep_size=ep) if ep else DistributedConfig(tp_plan="auto")
    model = cls.from_pretrained(source, dtype="auto", distributed_config=config)
    return model, {"requested": _unique_bytes(model)}


def fastsafetensors_state(source: str, device: Any = "cpu", dims: dict | None = None) -> dict:
    """Every rank (collective): fastsafetensors with the checkpoint's files spread over the ranks
    (each read by one), then every tensor fetched on every rank (its shard along ``dims[key]``
    where given). Also run by the emulated-cluster baseline (:mod:`benchmarks.cluster_emu.rank_fst`)."""
    import torch.distributed as dist
    from fastsafetensors import SafeTensorsFileLoader
    from benchmarks.procfs import checkpoint_files
    files = checkpoint_files(source)
    world = dist.get_world_size()
    dims = dims or {}
    loader = SafeTensorsFileLoader(dist.group.WORLD, device, nogds=True, set_numa=False)
    try:
        loader.add_filenames({r: files[r::world] for r in range(world) if files[r::world]})
        buffers = loader.copy_files_to_device()
        try:
            return {key: (buffers.get_sharded(key, dims[key]) if dims.get(key) is not None
                          else buffers.get_tensor(key)) for key in loader.get_keys()}
        finally:
            buffers.close()
    finally:
        loader.close()


def load_fastsafetensors(source: str, ctx: dict) -> tuple[Any, dict]:
    return fastsafetensors_state(source), {}


def load_fastsafetensors_tp(source: str, ctx: dict) -> tuple[Any, dict]:
    return fastsafetensors_state(source, dims=ctx["tp_dims"]), {}


def _local_cuda() -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def load_gpu_load_file(source: str, ctx: dict) -> tuple[Any, dict]:
    from safetensors.torch import load_file
    from benchmarks.procfs import checkpoint_files
    state: dict = {}
    for path in checkpoint_files(source):
        state.update(load_file(path, device=_local_cuda()))
    return state, {"requested": _tensor_bytes(state)}


def load_gpu_fastsafetensors(source: str, ctx: dict) -> tuple[Any, dict]:
    import torch
    return fastsafetensors_state(source, torch.device(_local_cuda())), {}


def load_gpu_wc_replicate_collective(source: str, ctx: dict) -> tuple[Any, dict]:
    from weightcast.workers.api import load_pretrained
    state, report = load_pretrained(source, model=None, device_map="replicate", transport="collective",
                                    return_report=True, progress=False, timeout=ctx.get("timeout", 300.0))
    rank = int(os.environ.get("RANK", 0))
    return state, {"requested": report["ranks"][rank]["read_bytes"], "report": report if rank == 0 else None}


def load_runai(source: str, ctx: dict) -> tuple[Any, dict]:
    from runai_model_streamer import SafetensorsStreamer
    from benchmarks.procfs import checkpoint_files
    state = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(checkpoint_files(source), device="cpu", is_distributed=True)
        for name, tensor in streamer.get_tensors():
            state[name] = tensor
    return state, {}


def load_weightcast(source: str, ctx: dict, device_map: str, transport: str) -> tuple[Any, dict]:
    """``load_pretrained(model="auto", strict=False)`` (unexpected checkpoint keys ignored, as
    ``from_pretrained`` does), with the gathered report (bytes read, phases) but without its
    memory probe: the harness reads every rank's memory itself, after touching."""
    from weightcast.workers.api import load_pretrained
    model, report = load_pretrained(source, model="auto", device_map=device_map, transport=transport,
                                    strict=False, return_report=True, report_memory=False, progress=False,
                                    timeout=ctx.get("timeout", 300.0))
    rank = int(os.environ.get("RANK", 0))
    return model, {"requested": report["ranks"][rank]["read_bytes"], "report": report if rank == 0 else None}


def _unique_bytes(model: Any) -> int:
    """Bytes of a model's distinct parameter and buffer storages held on this rank."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=False).values():
        if hasattr(t, "to_local"):
            t = t.to_local()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen and not t.is_meta:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def load_function(name: str) -> Callable[[str, dict], tuple[Any, dict]]:
    """The load function of a loader name."""
    if name.startswith("wc_"):
        _, device_map, transport = name.split("_", 2)
        return lambda source, ctx: load_weightcast(source, ctx, device_map, transport)
    return globals()[f"load_{name}"]


def tp_dims(source: str, world: int) -> dict[str, int | None]:
    """Per tensor, the dim weightcast's ``tp`` device map shards it along (None: replicated);
    used to give fastsafetensors the same tensor-parallel layout."""
    from weightcast.orchestrator.checkpoint import load_index
    from weightcast.orchestrator.cluster import cluster_from_facts
    from weightcast.orchestrator.device_map import Shard, build_device_map
    with open(os.path.join(source, "config.json")) as fh:
        config = json.load(fh)
    index = load_index(source)
    facts = [{"rank": r, "local_rank": r, "host": "bench", "device": "cpu", "device_memory": 1 << 40,
              "host_memory": 1 << 40} for r in range(world)]
    dm = build_device_map(index, cluster_from_facts(facts), "tp", config=config)
    return {name: (p.dim if isinstance(p, Shard) else None) for name, p in dm.placements.items()}
