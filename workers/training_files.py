"""The small files of a training checkpoint: which exist (rank 0, :func:`find_files`), reading them
on every rank (:func:`load_small_files`, ``torch.load(weights_only=True)`` only) and restoring RNG
states (:func:`apply_rng`).

Layouts: transformers' ``Trainer`` (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state.pth`` for one process or ``rng_state_<rank>.pth``) and accelerate's ``save_state``
(``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``).
"""
from __future__ import annotations

import os
import random
from typing import Any

import torch

from weightcast.orchestrator.errors import CheckpointFormatError, CheckpointNotFoundError, ConfigError

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILES = ("scheduler.pt", "scheduler.bin")
SCALER_FILES = ("scaler.pt",)


def _first(checkpoint_dir: str, names: tuple[str, ...], what: str, required: bool) -> str | None:
    for name in names:
        if os.path.isfile(os.path.join(checkpoint_dir, name)):
            return name
    if required:
        raise CheckpointNotFoundError(f"The checkpoint has no {what} state", where=checkpoint_dir,
                                      expected=" or ".join(names),
                                      fix=f"pass {what}=None to leave it as it is, or resume from a complete checkpoint")
    return None


def find_files(checkpoint_dir: str, want: dict, world_size: int) -> dict:
    """Rank 0: the files to read, per ``want`` (``optimizer``, ``scheduler``, ``scaler``, ``rng``).
    Raises CheckpointNotFoundError for a missing file that was asked for, ConfigError when the RNG
    files were saved by another number of processes."""
    files: dict[str, Any] = {"root": os.path.abspath(checkpoint_dir)}
    files["optimizer"] = _first(checkpoint_dir, OPTIMIZER_FILES, "optimizer", want["optimizer"])
    files["scheduler"] = _first(checkpoint_dir, SCHEDULER_FILES, "scheduler", want["scheduler"])
    files["scaler"] = _first(checkpoint_dir, SCALER_FILES, "scaler", want["scaler"])
    files["rng"] = rng_files(checkpoint_dir, world_size) if want["rng"] else None
    return files


def rng_files(checkpoint_dir: str, world_size: int) -> list[str]:
    """One RNG file per rank of this job, or a ConfigError naming the saved world size and the fix."""
    names = os.listdir(checkpoint_dir)
    trainer = sorted(n for n in names if n.startswith("rng_state_") and n.endswith(".pth"))
    accel = sorted(n for n in names if n.startswith("random_states_") and n.endswith(".pkl"))
    if "rng_state.pth" in names and not trainer:
        saved, found = 1, ["rng_state.pth"]
    elif trainer:
        saved, found = len(trainer), [f"rng_state_{r}.pth" for r in range(world_size)]
    else:
        saved, found = len(accel), [f"random_states_{r}.pkl" for r in range(world_size)]
    if saved == 0:
        raise CheckpointNotFoundError("The checkpoint has no RNG state", where=checkpoint_dir,
                                      expected="rng_state.pth, rng_state_<rank>.pth or random_states_<rank>.pkl",
                                      fix="pass rng='skip' to keep the current RNG state")
    if saved != world_size or not all(n in names for n in found):
        raise ConfigError("The checkpoint's RNG states were saved by another number of processes",
                          where=checkpoint_dir, expected=f"{world_size} RNG file(s), one per rank of this job",
                          got=f"{saved}: {(trainer or accel or ['rng_state.pth'])[:4]}",
                          fix=f"resume with {saved} rank(s), or pass rng='skip' to keep the current RNG state "
                              "(data order and dropout then differ from an uninterrupted run)")
    return found


def _safe_globals() -> Any:
    """numpy's RNG state is an ndarray: allow exactly what transformers allows for it."""
    import numpy as np
    core = np._core if hasattr(np, "_core") else np.core
    allow = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return torch.serialization.safe_globals(allow)


def torch_load_small(path: str) -> Any:
    """``torch.load(weights_only=True)`` of a small checkpoint file, errors made clear."""
    import pickle
    try:
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from weightcast.orchestrator.errors import PickleRefusedError
        raise PickleRefusedError("A checkpoint file is not a weights-only pickle", where=path,
                                 got=str(exc)[:300], fix="only resume from files you trust; save it again") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointFormatError("A checkpoint file cannot be read (damaged or truncated)", where=path,
                                    got=f"{type(exc).__name__}: {str(exc)[:300]}") from None


def load_small_files(files: dict, rank: int, want: dict) -> dict:
    """Every rank: scheduler, scaler and this rank's RNG state (each file is a few KB)."""
    root = files["root"]
    out: dict[str, Any] = {}
    for key in ("scheduler", "scaler"):
        if want[key]:
            out[key] = torch_load_small(os.path.join(root, files[key]))
    if files.get("rng"):
        out["rng"] = torch_load_small(os.path.join(root, files["rng"][rank]))
    return out


def apply_rng(state: dict | None) -> None:
    """Restore python, numpy, torch CPU (and CUDA) generators from a Trainer or accelerate state."""
    if not state:
        return
    import numpy as np
    if "python" in state:  # Trainer
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and "cuda" in state:
            cuda = state["cuda"]
            if isinstance(cuda, (list, tuple)):
                torch.cuda.random.set_rng_state_all(cuda)
            else:
                torch.cuda.random.set_rng_state(cuda)
        return
    random.setstate(state["random_state"])  # accelerate
    np.random.set_state(state["numpy_random_seed"])
    torch.set_rng_state(state["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in state:
        torch.cuda.set_rng_state_all(state["torch_cuda_manual_seed"])
