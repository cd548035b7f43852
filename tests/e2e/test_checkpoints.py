"""The run folder through the command line (`trl_gspo.cli.main`, in-process): nothing a run wrote is lost.

A new run into a folder that holds one is refused before the model loads (unless --resume or --overwrite_output_dir);
`--resume true` takes the newest complete checkpoint (trl_gspo/checkpoints.py), names each newer one it passes over
(cut short, or with a truncated file) and the one it resumes from; a save cut short after transformers' checkpoint
rotation keeps the previous complete checkpoint. Tiny model, 2 to 4 optimizer steps per run.
"""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gspo_examples.tiny import save_tiny_model
from trl_gspo import cli
from trl_gspo.checkpoints import COMPLETE_MARK, checkpoint_problem

REWARD_MODULE = "gspo_checkpoint_rewards"
ROWS = [{"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(16)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model, the data, and a reward that spreads within groups (so the weights move)."""
    root = tmp_path_factory.mktemp("checkpoints")
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (root / f"{REWARD_MODULE}.py").write_text(
        "def length_reward(completions, **kwargs):\n    return [float(len(c[-1]['content']) % 4) for c in completions]\n"
    )
    model = save_tiny_model(root / "model", hidden_size=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        yield SimpleNamespace(root=root, model=model, data=root / "data.jsonl")


def write_recipe(assets, folder: Path, **overrides) -> Path:
    """4 optimizer steps, 2 per rollout, a checkpoint every 2 (on rollout boundaries: resumes are exact)."""
    recipe = dict(
        model_name_or_path=assets.model,
        dataset_name=str(assets.data),
        answer_column="answer",
        reward_funcs=[f"{REWARD_MODULE}.length_reward"],
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=4,
        steps_per_generation=2,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        use_cpu=True,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=2,
        seed=0,
        output_dir=str(folder / "out"),
    )
    recipe.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished 4-step run: checkpoint-2, checkpoint-4 and the final model."""
    folder = tmp_path_factory.mktemp("finished")
    cli.main(["--config", str(write_recipe(assets, folder))])
    return folder / "out"


def copy_run(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def checksums(folder: Path) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def no_trainer(monkeypatch):
    """Building the trainer (which loads the model) is an error: the checks under test must fire before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer was built: the check came too late")

    monkeypatch.setattr(cli, "GSPOTrainer", refuse)


def test_finished_run_checkpoints_are_marked_complete(finished):
    for step in (2, 4):
        folder = finished / f"checkpoint-{step}"
        mark = json.loads((folder / COMPLETE_MARK).read_text())
        assert mark["global_step"] == step and "gspo_rollout_buffer_rank0.pt" in mark["files"]
        assert mark["files"]["optimizer.pt"] == (folder / "optimizer.pt").stat().st_size
        assert checkpoint_problem(folder) is None


# --- a second run into a used output_dir -------------------------------------------------------------------------


def test_a_new_run_into_a_used_output_dir_is_refused_before_the_model_loads(
    assets, finished, tmp_path, capsys, no_trainer
):
    """One line naming the folder and the ways on; no file changed (it used to overwrite both checkpoints and the
    final model, exit status 0)."""
    out = copy_run(finished, tmp_path)
    before = checksums(out)
    line = error_line(capsys, ["--config", str(write_recipe(assets, tmp_path, seed=1))])
    for fragment in (f"output_dir={str(out)!r} already holds a run", "checkpoint-4", "--resume true"):
        assert fragment in line, line
    assert "--overwrite_output_dir true" in line and "another output_dir" in line
    # continuing another run's checkpoint into this folder would overwrite it just the same
    other_run = str(finished / "checkpoint-2")
    line = error_line(capsys, ["--config", str(write_recipe(assets, tmp_path)), "--resume_from_checkpoint", other_run])
    assert f"output_dir={str(out)!r} already holds a run" in line
    assert checksums(out) == before


def test_an_empty_or_data_only_output_dir_is_not_a_used_one(assets, tmp_path):
    """The tiny recipes keep their data inside output_dir (runs/tiny/<task>/data): that folder is not a run."""
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text(assets.data.read_text())
    recipe = write_recipe(assets, tmp_path, max_steps=2, save_strategy="no")
    assert cli.main(["--config", str(recipe)]).state.global_step == 2
    assert (out / "model.safetensors").is_file() and (out / "data" / "train.jsonl").is_file()


def test_overwrite_output_dir_replaces_the_earlier_run(assets, finished, tmp_path, capsys):
    """--overwrite_output_dir deletes the earlier run's checkpoints first: --resume can then only find this run's
    (a 2-step run must not leave the 4-step run's checkpoint-4 to be taken as its own)."""
    out = copy_run(finished, tmp_path)
    recipe = write_recipe(assets, tmp_path)
    trainer = cli.main(["--config", str(recipe), "--overwrite_output_dir", "true", "--max_steps", "2"])
    assert trainer.state.global_step == 2
    assert "deleted the earlier run's checkpoint-2, checkpoint-4" in capsys.readouterr().out
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "trainer_state.json").read_text())["max_steps"] == 2
    # resuming it with the earlier run's max_steps continues this run from its step 2
    assert cli.main(["--config", str(recipe), "--resume", "true", "--max_steps", "2"]) is None
    assert "step 2 of max_steps=2" in capsys.readouterr().out
    line = error_line(capsys, ["--config", str(recipe), "--resume", "true", "--overwrite_output_dir", "true"])
    assert "resume=True" in line and "overwrite_output_dir=True" in line


# --- a checkpoint cut short, a damaged file ----------------------------------------------------------------------


@pytest.mark.parametrize("cut_short", ["config-only", "unmarked-copy"])
def test_resume_takes_the_newest_complete_checkpoint_and_says_so(assets, finished, tmp_path, capsys, cut_short):
    """A SIGTERM during the save of checkpoint-6 leaves a folder without the mark: `--resume true` names it once,
    resumes from checkpoint-4, says so, and writes a complete checkpoint-6."""
    out = copy_run(finished, tmp_path)
    if cut_short == "config-only":  # what a preemption during transformers' model save leaves
        (out / "checkpoint-6").mkdir()
        shutil.copy(out / "checkpoint-4" / "config.json", out / "checkpoint-6")
    else:  # every file but the rollout buffer and the mark: stopped between transformers' save and GSPOTrainer's
        shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
        (out / "checkpoint-6" / COMPLETE_MARK).unlink()
        (out / "checkpoint-6" / "gspo_rollout_buffer_rank0.pt").unlink()
    recipe = write_recipe(assets, tmp_path, max_steps=6)
    trainer = cli.main(["--config", str(recipe), "--resume", "true"])
    assert trainer.state.global_step == 6
    lines = capsys.readouterr().out.splitlines()
    assert f"skipping {out / 'checkpoint-6'}: not marked complete" in "\n".join(lines)
    assert f"resuming from {out / 'checkpoint-4'} (step 4 of 6)" in lines
    assert checkpoint_problem(out / "checkpoint-6") is None  # rewritten whole by the resumed run


@pytest.mark.parametrize(("damaged", "size"), [("trainer_state.json", 700), ("optimizer.pt", 1000)])
def test_resume_passes_over_a_truncated_file_naming_it(assets, finished, tmp_path, capsys, damaged, size):
    out = copy_run(finished, tmp_path)
    os.truncate(out / "checkpoint-4" / damaged, size)
    recipe = write_recipe(assets, tmp_path, max_steps=6)
    trainer = cli.main(["--config", str(recipe), "--resume", "true"])
    assert trainer.state.global_step == 6
    printed = capsys.readouterr().out
    assert f"skipping {out / 'checkpoint-4'}: {damaged} has {size} bytes" in printed
    assert f"resuming from {out / 'checkpoint-2'} (step 2 of 6)" in printed


@pytest.mark.parametrize("damaged", ["trainer_state.json", "optimizer.pt"])
def test_no_complete_checkpoint_is_one_error_line_naming_each(assets, finished, tmp_path, capsys, no_trainer, damaged):
    out = copy_run(finished, tmp_path)
    for step in (2, 4):
        os.truncate(out / f"checkpoint-{step}" / damaged, 500)
    recipe = write_recipe(assets, tmp_path, max_steps=6)
    line = error_line(capsys, ["--config", str(recipe), "--resume", "true"])
    assert f"{damaged} has 500 bytes" in line and "checkpoint-4" in line and "checkpoint-2" in line
    explicit = str(out / "checkpoint-4")
    line = error_line(capsys, ["--config", str(recipe), "--resume_from_checkpoint", explicit])
    assert f"resume_from_checkpoint={explicit!r} cannot be resumed from: {damaged} has 500 bytes" in line


def test_checkpoint_without_mark_is_resumed_only_when_named(assets, finished, tmp_path, capsys):
    """A checkpoint written before checkpoints were marked (no mark): `--resume true` does not take it and says how
    to; named with --resume_from_checkpoint it is taken when all its files read."""
    out = copy_run(finished, tmp_path)
    for folder in out.glob("checkpoint-*"):
        (folder / COMPLETE_MARK).unlink()
    recipe = write_recipe(assets, tmp_path, max_steps=6)
    line = error_line(capsys, ["--config", str(recipe), "--resume", "true"])
    assert "checkpoint-4, checkpoint-2: not marked complete" in line and "--resume_from_checkpoint" in line
    trainer = cli.main(["--config", str(recipe), "--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert trainer.state.global_step == 6
    assert f"resuming from {out / 'checkpoint-4'} (step 4 of 6)" in capsys.readouterr().out


def test_trainer_refuses_a_damaged_checkpoint_by_name(assets, finished, tmp_path):
    """Past the command line's checks (trainer.train(resume_from_checkpoint=...) from Python): one error naming the
    checkpoint and the file, not torch's zip-archive traceback."""
    out = copy_run(finished, tmp_path)
    os.truncate(out / "checkpoint-4" / "optimizer.pt", 1000)
    script_args, training_args, model_args = cli.parse_args(["--config", str(write_recipe(assets, tmp_path / "new"))])
    inputs = cli.check_inputs(script_args, training_args, model_args)
    inputs.checkpoint = str(out / "checkpoint-4")
    with pytest.raises(ValueError, match=r"checkpoint-4 cannot be resumed from: optimizer\.pt has 1000 bytes"):
        cli.train(script_args, training_args, model_args, inputs=inputs)


# --- checkpoint rotation -----------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_a_save_cut_short_keeps_the_previous_complete_checkpoint(assets, finished, tmp_path, monkeypatch, capsys):
    """save_total_limit=1: transformers deletes the older checkpoint at the end of its own save, before GSPOTrainer
    writes the rollout buffer; stopped there, checkpoint-2 must still be on disk, and the resumed run must reach the
    weights of the run never stopped."""
    save = torch.save

    def save_then_stop_at_the_rollout_buffer_of_checkpoint_4(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and "gspo_rollout_buffer" in str(path):
            raise Interrupted("stopped while writing checkpoint-4")
        return save(obj, path, *args, **kwargs)

    recipe = write_recipe(assets, tmp_path, save_total_limit=1)
    monkeypatch.setattr(torch, "save", save_then_stop_at_the_rollout_buffer_of_checkpoint_4)
    with pytest.raises(Interrupted):
        cli.main(["--config", str(recipe)])
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out"
    assert (out / "checkpoint-2").is_dir(), "the complete checkpoint was rotated away before the new one was complete"
    assert checkpoint_problem(out / "checkpoint-2") is None
    assert checkpoint_problem(out / "checkpoint-4").startswith("not marked complete")

    capsys.readouterr()
    trainer = cli.main(["--config", str(recipe), "--resume", "true"])
    assert trainer.state.global_step == 4
    assert f"resuming from {out / 'checkpoint-2'} (step 2 of 4)" in capsys.readouterr().out
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-4"]  # rotated after the mark
    got, expected = load_file(out / "model.safetensors"), load_file(finished / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7, msg=f"{name} differs")
