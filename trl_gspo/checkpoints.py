"""Which `checkpoint-N` folders a run may resume from: complete ones only.

A checkpoint is written file by file (the model, optimizer, scheduler, RNG states and trainer_state.json by
transformers' Trainer, then GSPOTrainer's rollout buffer, on every rank): a job stopped in between, e.g. by a cluster
preemption's SIGTERM, leaves a folder that looks like a checkpoint and cannot be resumed. So GSPOTrainer marks a
checkpoint once every rank has written it: the main process writes COMPLETE_MARK last, listing every file of the
folder with its size (`write_complete_mark`).

The rule (`checkpoint_problem`): a checkpoint is complete when its mark is there, every file it lists has the size it
had when written, and every file reads (`unreadable_file`: JSON parses, a torch archive has its directory, a
safetensors file has the size its header says). A folder without a mark (cut short, or written before checkpoints
were marked) is never picked by `--resume true`; named by `resume_from_checkpoint` it is taken when it holds
trainer_state.json and every file in it reads.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

COMPLETE_MARK = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, in every checkpoint it writes
UNMARKED = "not marked complete (cut short while being written, or written before checkpoints were marked)"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (the default since torch 1.6)


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, newest (largest N) first; [] for a missing folder."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """Every file under `folder` but the mark, as {relative posix path: size in bytes}."""
    root = Path(folder)
    return {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARK
    }


def write_complete_mark(folder: str | os.PathLike, global_step: int) -> None:
    """Mark `folder` complete: write COMPLETE_MARK (its files and sizes) under a temporary name, then rename it, so
    that the mark itself is never half written. Call it once every file of the checkpoint is written."""
    folder = Path(folder)
    staging = folder / f".{COMPLETE_MARK}.{os.getpid()}.tmp"  # per process: with save_on_each_node, one per node
    staging.write_text(json.dumps({"global_step": global_step, "files": file_sizes(folder)}, indent=1))
    os.replace(staging, folder / COMPLETE_MARK)


def unreadable_file(path: str | os.PathLike) -> str | None:
    """Why the file at `path` cannot be read back, or None. Cheap checks that catch a truncated file without loading
    it: JSON parses, a torch archive (.pt/.pth/.bin) has its zip directory (which is at its end), a .safetensors file
    is as long as its header says. Other files only need to exist."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    suffix = path.suffix
    try:
        if suffix == ".json":
            json.loads(path.read_text())
        elif suffix in (".pt", ".pth", ".bin"):
            with open(path, "rb") as file:
                is_archive = file.read(4) == _ZIP_MAGIC
            if is_archive:  # an older pickle-only torch file has no directory to check
                with zipfile.ZipFile(path):
                    pass
        elif suffix == ".safetensors":
            with safe_open(path, "pt"):  # reads the header only, and refuses a file its tensors do not cover exactly
                pass
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, SafetensorError) as error:
        return f"does not read ({type(error).__name__}: {error})"
    return None


def checkpoint_problem(folder: str | os.PathLike, require_mark: bool = True) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from, naming the file at fault, or None when it can (the rule in
    the module docstring). Without `require_mark` a folder without a mark is checked by its files alone."""
    folder = Path(folder)
    mark = folder / COMPLETE_MARK
    if mark.is_file():
        try:
            expected = json.loads(mark.read_text())["files"]
        except (ValueError, KeyError, TypeError) as error:
            return f"{COMPLETE_MARK} does not read ({type(error).__name__}: {error})"
        for name, size in expected.items():
            path = folder / name
            if path.is_file() and path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} when the checkpoint was written"
    elif require_mark:
        return UNMARKED
    else:
        expected = file_sizes(folder)
        if TRAINER_STATE not in expected:
            return f"{TRAINER_STATE} is missing"
    for name in expected:
        if problem := unreadable_file(folder / name):
            return f"{name} {problem}"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in `output_dir` (None if there is none) and the newer ones passed over, each
    with its `checkpoint_problem`."""
    skipped = []
    for folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


# What a run writes into its output_dir: a folder holding one of these already holds a run.
RUN_OUTPUTS = (f"{PREFIX_CHECKPOINT_DIR}-*", TRAINER_STATE, "config.json", "adapter_config.json", ".final-model-*")


def run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """The names in `output_dir` that an earlier run wrote there (RUN_OUTPUTS), sorted; [] for a missing folder."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted({path.name for pattern in RUN_OUTPUTS for path in folder.glob(pattern)})
