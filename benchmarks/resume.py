"""Resume benchmark: a Trainer-layout checkpoint (Llama weights + AdamW state) resumed on N local
ranks, Trainer's own way (every rank ``load_state_dict`` of the weights and ``torch.load`` of the
whole ``optimizer.pt``) against ``weightcast.load_training_state``, side by side.

    python -m benchmarks.resume --hidden 1024 --layers 8 --nprocs 2 4 --repeats 3

Per configuration: wall time of the resume (max over ranks, after a barrier, model and optimizer
already built), summed PSS and private bytes of the ranks right after it, and storage bytes
(Trainer: every rank reads every byte; weightcast: its report). The page cache is warmed before
each trial (both read warm files). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def make_checkpoint(path: str, hidden: int, layers: int) -> dict:
    """A Llama checkpoint-N directory as Trainer writes it (weights, optimizer.pt after one AdamW
    step, scheduler.pt, rng_state_<r>.pth for 4 ranks, trainer_state.json)."""
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return json.load(open(os.path.join(path, "bench.json")))
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=32000,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    opt, sched = optimizer_for(model)
    ids = torch.randint(0, 32000, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    model.save_pretrained(path)
    torch.save(opt.state_dict(), os.path.join(path, "optimizer.pt"))
    torch.save(sched.state_dict(), os.path.join(path, "scheduler.pt"))
    from weightcast.workers.training_save import rng_states
    torch.save(rng_states(), os.path.join(path, "rng_state_0.pth"))
    json.dump({"global_step": 1}, open(os.path.join(path, "trainer_state.json"), "w"))
    info = {"weights_bytes": os.path.getsize(os.path.join(path, "model.safetensors")),
            "optimizer_bytes": os.path.getsize(os.path.join(path, "optimizer.pt")),
            "params": sum(p.numel() for p in model.parameters())}
    json.dump(info, open(os.path.join(path, "bench.json"), "w"))
    return info


def for_ranks(path: str, n: int) -> str:
    """The checkpoint as N ranks saved it: the same files (hard links), one RNG file per rank."""
    out = f"{path}-n{n}"
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(path):
        if name != "bench.json" and not os.path.exists(os.path.join(out, name)) and not name.startswith("rng_"):
            os.link(os.path.join(path, name), os.path.join(out, name))
    for r in range(n):
        dest = os.path.join(out, f"rng_state_{r}.pth")
        if not os.path.exists(dest):
            os.link(os.path.join(path, "rng_state_0.pth"), dest)
    return out


def optimizer_for(model: torch.nn.Module):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _build(path: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def trainer_resume(path: str, model: torch.nn.Module, opt, sched) -> None:
    """What Trainer does on every rank (DDP, CPU): weights, the whole optimizer file, scheduler, RNG."""
    from safetensors.torch import load_file
    from weightcast.workers.training_files import apply_rng, torch_load_small
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=False)
    opt.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    sched.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    apply_rng(torch_load_small(os.path.join(path, f"rng_state_{os.environ['RANK']}.pth")))


def job(args: dict) -> dict:
    """One rank of one trial (run through weightcast.launch.local.spawn)."""
    import torch.distributed as dist
    from weightcast.workers.report import memory_now
    path, mode = args["path"], args["mode"]
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = _build(path)
    opt, sched = optimizer_for(model)
    _warm(path)
    dist.barrier()
    t0 = time.perf_counter()
    report = None
    if mode == "trainer":
        trainer_resume(path, model, opt, sched)
    else:
        from weightcast.workers.training_state import load_training_state
        _, report = load_training_state(path, model, opt, sched, rng="skip" if args["skip_rng"] else "restore",
                                        return_report=True)
    seconds = time.perf_counter() - t0
    dist.barrier()
    mem = memory_now()
    return {"seconds": seconds, "pss": mem.get("pss_bytes"), "private": mem.get("private_bytes"),
            "report": report}


def _warm(path: str) -> None:
    for name in ("model.safetensors", "optimizer.pt"):
        with open(os.path.join(path, name), "rb") as f:
            while f.read(64 << 20):
                pass


def trial(path: str, mode: str, nproc: int) -> dict:
    from weightcast.launch.local import spawn
    results = spawn(nproc, "benchmarks.resume:job", {"path": path, "mode": mode, "skip_rng": False},
                    timeout=900)
    values = [r.value for r in results]
    out = {"seconds": max(v["seconds"] for v in values), "pss": sum(v["pss"] or 0 for v in values),
           "private": sum(v["private"] or 0 for v in values)}
    if mode == "weightcast":
        rep = values[0]["report"]
        out["storage"] = rep["weights"]["total_read_bytes"] + sum(r["read_bytes"] for r in rep["optimizer"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="bench_data/resume")
    args = parser.parse_args(argv)
    path = os.path.join(args.dir, f"llama-h{args.hidden}-l{args.layers}", "checkpoint-1")
    os.makedirs(path, exist_ok=True)
    info = make_checkpoint(path, args.hidden, args.layers)
    total = info["weights_bytes"] + info["optimizer_bytes"]
    print(f"checkpoint: {info['params'] / 1e6:.1f} M params, weights {info['weights_bytes'] / 1e9:.3f} GB, "
          f"optimizer.pt {info['optimizer_bytes'] / 1e9:.3f} GB")
    print("| N | loader | time s (min / median) | summed PSS GB | summed private GB | storage bytes |")
    print("|---|---|---|---|---|---|")
    for n in args.nprocs:
        ckpt = for_ranks(path, n)
        for mode in ("trainer", "weightcast"):
            runs = [trial(ckpt, mode, n) for _ in range(args.repeats)]
            times = [r["seconds"] for r in runs]
            storage = runs[0].get("storage", n * total)
            print(f"| {n} | {mode} | {min(times):.2f} / {statistics.median(times):.2f} | "
                  f"{statistics.median(r['pss'] for r in runs) / 1e9:.2f} | "
                  f"{statistics.median(r['private'] for r in runs) / 1e9:.2f} | "
                  f"{storage / total:.2f}x ({storage / 1e9:.2f} GB) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
