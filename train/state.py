"""Full-state checkpoints: each rank's share is its stepper's state (weights, optimiser, LR schedule) plus
its loop position and RNG states, so a restarted run continues at the same step, LR and next batch."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nezha.config import ConfigError
from nezha.training import LoopState
from train.steppers import DeepSpeedStepper, TorchStateStepper


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loop_file(rank: int) -> str:
    return f"loop_rank{rank}.pt"


def save_full_state(stepper: TorchStateStepper | DeepSpeedStepper, folder: Path, rank: int, state: LoopState) -> None:
    """This rank's share of a full-state checkpoint: the stepper's state plus its loop position and RNG."""
    folder.mkdir(parents=True, exist_ok=True)
    stepper.save_state(folder)
    torch.save({"loop": dataclasses.asdict(state), "rng": rng_state()}, folder / loop_file(rank))


def load_full_state(stepper: TorchStateStepper | DeepSpeedStepper, folder: Path, rank: int) -> LoopState:
    own = folder / loop_file(rank)
    if not own.is_file():
        raise ConfigError(f"{folder} has no {own.name}: a run resumes with the number of workers it was saved with")
    stepper.load_state(folder)
    # Our own file (RNG states are tuples and arrays, which weights_only refuses).
    saved = torch.load(own, weights_only=False)
    set_rng_state(saved["rng"])
    return LoopState(**saved["loop"])
