"""Loading the rollout buffer a GSPOTrainer checkpoint holds (`gspo_rollout_buffer_rank{N}.pt`), safely.

A checkpoint may come from someone else: a full unpickle (`weights_only=False`) of it can run arbitrary code.
GRPOTrainer's buffered rollout is a list of dicts of tensors, None, numbers and strings, which torch's restricted
unpickler (`weights_only=True`) reads as is; anything else in the file is refused with an error naming it.
"""

from __future__ import annotations

import os
import pickle

import torch


class UnsafeCheckpointError(RuntimeError):
    """A rollout buffer file holds objects other than tensors and plain containers; it was not loaded."""


def load_rollout_buffer(path: str | os.PathLike, device: torch.device | str = "cpu") -> list[dict]:
    """The buffered rollout saved at `path`, loaded onto `device`; UnsafeCheckpointError naming the file and the
    refused object if it holds anything torch's weights-only unpickler does not allow, e.g. a pickled callable."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path}: refused to load the rollout buffer: it holds objects other than tensors and plain containers, "
            f"which could run code when unpickled (torch: {str(error).splitlines()[0]}). Only resume from "
            "checkpoints you trust, and delete this file to regenerate the rollout instead."
        ) from None
