"""trl_gspo.checkpoints on hand-built folders: what counts as a complete checkpoint, and why one does not."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from trl_gspo.checkpoints import (
    COMPLETE_MARK,
    UNMARKED,
    checkpoint_folders,
    checkpoint_problem,
    latest_complete_checkpoint,
    run_outputs,
    unreadable_file,
    write_complete_mark,
)


def write_checkpoint(folder, step: int, mark: bool = True):
    """The files of a checkpoint, each of a kind `unreadable_file` checks, marked complete or not."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": [{"loss": 0.5}] * 20}))
    torch.save({"state": {0: {"exp_avg": torch.ones(64)}}}, folder / "optimizer.pt")
    save_file({"weight": torch.zeros(8, 8)}, folder / "model.safetensors")
    (folder / "global_step2").mkdir()  # DeepSpeed and FSDP write sub-folders
    torch.save({"shard": torch.ones(4)}, folder / "global_step2" / "shard_0.pt")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    if mark:
        write_complete_mark(folder, step)
    return folder


def test_mark_lists_every_file_with_its_size(tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint-2", 2)
    mark = json.loads((folder / COMPLETE_MARK).read_text())
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    del sizes[COMPLETE_MARK]
    assert mark == {"global_step": 2, "files": sizes}
    assert "global_step2/shard_0.pt" in mark["files"] and not list(folder.glob(".*"))  # no staging file left
    assert checkpoint_problem(folder) is None


@pytest.mark.parametrize(
    "name", ["trainer_state.json", "optimizer.pt", "model.safetensors", "global_step2/shard_0.pt"]
)
def test_truncated_file_is_named_marked_or_not(tmp_path, name):
    marked = write_checkpoint(tmp_path / "checkpoint-2", 2)
    unmarked = write_checkpoint(tmp_path / "checkpoint-4", 4, mark=False)
    size = (marked / name).stat().st_size
    for folder in (marked, unmarked):
        os.truncate(folder / name, size - 5)
    assert checkpoint_problem(marked) == f"{name} has {size - 5} bytes, {size} when the checkpoint was written"
    problem = checkpoint_problem(unmarked, require_mark=False)
    assert problem.startswith(f"{name} does not read ("), problem
    assert unreadable_file(unmarked / name).startswith("does not read (")


def test_same_size_damage_and_a_missing_file_are_found(tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint-2", 2)
    text = (folder / "trainer_state.json").read_text()
    (folder / "trainer_state.json").write_text(text[:-1] + "!")  # same size, not JSON
    assert checkpoint_problem(folder).startswith("trainer_state.json does not read (JSONDecodeError")
    folder = write_checkpoint(tmp_path / "checkpoint-4", 4)
    (folder / "optimizer.pt").unlink()
    assert checkpoint_problem(folder) == "optimizer.pt is missing"


def test_unmarked_folder_needs_trainer_state_when_named_and_the_mark_by_resume(tmp_path):
    config_only = tmp_path / "checkpoint-6"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    assert checkpoint_problem(config_only) == UNMARKED
    assert checkpoint_problem(config_only, require_mark=False) == "trainer_state.json is missing"
    whole = write_checkpoint(tmp_path / "checkpoint-4", 4, mark=False)
    assert checkpoint_problem(whole) == UNMARKED and checkpoint_problem(whole, require_mark=False) is None


def test_latest_complete_checkpoint_orders_by_step_and_names_what_it_skips(tmp_path):
    for step in (2, 9):
        write_checkpoint(tmp_path / f"checkpoint-{step}", step)
    write_checkpoint(tmp_path / "checkpoint-10", 10, mark=False)  # 10 > 9: numbers, not names, are compared
    damaged = write_checkpoint(tmp_path / "checkpoint-11", 11)
    os.truncate(damaged / "optimizer.pt", 10)
    (tmp_path / "checkpoint-12").write_text("a file, not a checkpoint folder")
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in checkpoint_folders(tmp_path)] == [
        "checkpoint-11",
        "checkpoint-10",
        "checkpoint-9",
        "checkpoint-2",
    ]
    latest, skipped = latest_complete_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-9"
    assert [(folder.name, problem.split(" ")[0]) for folder, problem in skipped] == [
        ("checkpoint-11", "optimizer.pt"),
        ("checkpoint-10", "not"),
    ]
    assert latest_complete_checkpoint(tmp_path / "missing") == (None, [])


def test_run_outputs(tmp_path):
    assert run_outputs(tmp_path / "missing") == [] and run_outputs(tmp_path) == []
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    assert run_outputs(tmp_path) == []  # the tiny recipes' data folder and a user's notes are not a run
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / ".final-model-incomplete").mkdir()
    assert run_outputs(tmp_path) == [".final-model-incomplete", "checkpoint-2", "trainer_state.json"]
