"""Checkpoints written atomically (temporary file + rename) and read with weights_only=True."""
from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import torch

from moebench.errors import UserError


def save(path: str | Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
        lines = [line for line in lines if line] or [type(e).__name__]
        # weights_only refuses a pickled object in a long message of advice; the line that names
        # the object is the reason (its own advice starts at "Please use")
        refused = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
        if refused:
            what = refused.removeprefix("WeightsUnpickler error:").split(" Please use")[0].strip()
            raise UserError(f"checkpoint {path} holds objects other than tensors and plain data ({what}): "
                            f"not a checkpoint written by moebench") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({lines[0]})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
