"""End to end: `scripts/train_gspo.py` / `trl_gspo.cli` on a tiny local model and local data files (CPU, seconds).

Covers: a recipe run writes the final model and a GSPO model card; a run interrupted after checkpoint-2 and resumed
with `--resume true` ends with exactly the weights of an uninterrupted run (generation RNG included); local
jsonl/parquet/csv data; and bad inputs, each of which fails before training with a message naming the culprit.
Most runs are in-process (`trl_gspo.cli`) for speed; one goes through the script in a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from gspo_examples.tiny import save_tiny_model
from trl_gspo import cli

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_gspo.py"
REWARD_MODULE = "gspo_e2e_rewards"  # written to a temp folder that is put on sys.path / PYTHONPATH
REWARD_SOURCE = '''
import math


def length_reward(completions, **kwargs):
    """Spread within every group, so advantages are non-zero and the weights move."""
    return [float(len(c[-1]["content"]) % 4) for c in completions]


def raising_reward(completions, **kwargs):
    raise KeyError("no such field")


def nan_reward(completions, **kwargs):
    return [math.nan] * len(completions)
'''
ROWS = [{"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(16)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Qwen2 (hidden 32) with its char tokenizer, the data as jsonl/parquet/csv, and a reward module."""
    import pandas as pd

    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny_model(root / "model", hidden_size=32)
    frame = pd.DataFrame(ROWS)
    data = {"jsonl": root / "data.jsonl", "parquet": root / "data.parquet", "csv": root / "data.csv"}
    data["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    frame.to_parquet(data["parquet"])
    frame.to_csv(data["csv"], index=False)
    (root / f"{REWARD_MODULE}.py").write_text(REWARD_SOURCE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        yield SimpleNamespace(root=root, model=model, data=data)


def write_recipe(assets, folder: Path, **overrides) -> Path:
    """A tiny recipe: 4 optimizer steps of 8 completions (2 prompts x 4), 2 optimizer steps per rollout.

    steps_per_generation=2 (with gradient_accumulation_steps=1) keeps the run off-policy and puts checkpoint-2 on
    a rollout boundary, where a resumed run can continue exactly. The constant learning rate makes the schedule
    independent of max_steps.
    """
    recipe = dict(
        model_name_or_path=str(assets.model),
        dataset_name=str(assets.data["jsonl"]),
        prompt_column="prompt",
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
        logging_steps=1,
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


def run(recipe: Path, *overrides: str, callbacks=None):
    script_args, training_args, model_args = cli.parse_args(["--config", str(recipe), *overrides])
    return cli.train(script_args, training_args, model_args, callbacks=callbacks)


def step_logs(trainer) -> dict[int, dict]:
    """Per-step training logs (loss, reward, completion lengths, clip ratios), keyed by step."""
    logs = {}
    for entry in trainer.state.log_history:
        if "loss" in entry:
            logs.setdefault(entry["step"], {}).update(entry)
    return logs


class Interrupted(Exception):
    pass


class InterruptAfterSave(TrainerCallback):
    """Crash right after checkpoint-`step` is written, like a job killed between two steps."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"interrupted after checkpoint-{self.step}")


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    recipe = write_recipe(assets, folder)
    trainer = run(recipe)
    return SimpleNamespace(out=folder / "out", logs=step_logs(trainer))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# --- a run, its final model and model card ---------------------------------------------------------------------------


def test_run_writes_final_model_and_gspo_model_card(uninterrupted, assets):
    out = uninterrupted.out
    for name in ("config.json", "model.safetensors", "README.md", "tokenizer.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert not (out / ".final-model-incomplete").exists()
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    card = (out / "README.md").read_text()
    assert "GSPO" in card and "2507.18071" in card
    assert sorted(uninterrupted.logs) == [1, 2, 3, 4]

    # the run trained: the final weights moved away from the initial ones
    initial, final = _weights(Path(assets.model)), _weights(out)
    assert max((final[k] - initial[k]).abs().max().item() for k in final) > 1e-4


def test_lora_through_model_arguments(assets, tmp_path):
    recipe = write_recipe(assets, tmp_path, max_steps=2, save_strategy="no")
    overrides = [
        "--use_peft",
        "true",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
    ]
    trainer = run(recipe, *overrides)
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter alone, not a merged model
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert trainer.state.global_step == 2


# --- resume ----------------------------------------------------------------------------------------------------------


def test_resume_matches_uninterrupted_run(assets, uninterrupted, tmp_path):
    """Interrupted after checkpoint-2, then `--resume true`: same weights and same steps 3-4 as a run never stopped.

    Steps 3-4 come from a rollout generated after the resume, so equal completion lengths, rewards and losses
    there also show that the generation RNG state was restored from the checkpoint.
    """
    recipe = write_recipe(assets, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        run(recipe, callbacks=[InterruptAfterSave(2)])
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert not (out / "model.safetensors").exists()

    resumed = run(recipe, "--resume", "true")
    assert resumed.state.global_step == 4

    expected, got = _weights(uninterrupted.out), _weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7, msg=f"{name} differs after resume")

    logs = step_logs(resumed)
    for step in (3, 4):
        for key in ("loss", "grad_norm", "clip_ratio/region_mean"):
            assert logs[step][key] == pytest.approx(uninterrupted.logs[step][key], rel=1e-6, abs=1e-9), (step, key)
    for key in ("reward", "completions/mean_length"):  # logged on the first step of a rollout
        assert logs[3][key] == uninterrupted.logs[3][key], key


def test_resume_inside_a_rollout_is_exact(assets, tmp_path):
    """4 optimizer steps per rollout, checkpoint at step 2 (mid-rollout): GSPOTrainer saves the rollout buffer,
    so the resumed run continues the same rollout and ends with the same weights (TRL alone regenerates it)."""
    reference = write_recipe(assets, tmp_path / "a", steps_per_generation=4)
    interrupted = write_recipe(assets, tmp_path / "b", steps_per_generation=4)
    run(reference)
    with pytest.raises(Interrupted):
        run(interrupted, callbacks=[InterruptAfterSave(2)])
    run(interrupted, "--resume", "true")
    expected, got = _weights(tmp_path / "a" / "out"), _weights(tmp_path / "b" / "out")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7)


# --- local data files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_local_data_files_load_alike(assets, kind):
    script_args = cli.GSPOScriptArguments(
        dataset_name=str(assets.data[kind]), prompt_column="prompt", answer_column="answer", system_prompt="Be brief."
    )
    dataset = cli.load_prompt_dataset(script_args, "train")
    assert sorted(dataset.column_names) == ["answer", "prompt"]
    assert len(dataset) == len(ROWS)
    for row, source in zip(dataset, ROWS):
        assert row["prompt"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": source["prompt"]},
        ]
        assert row["answer"] == source["answer"]  # csv reads "7" as 7: the answer column is passed on as a string


def test_script_runs_from_parquet_in_a_subprocess(assets, tmp_path):
    """The real entry point, `python scripts/train_gspo.py --config ...`, with command-line overrides."""
    recipe = write_recipe(assets, tmp_path, dataset_name=str(assets.data["parquet"]))
    out = tmp_path / "script-out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(assets.root), str(ROOT)]), OMP_NUM_THREADS="1")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(out)]
    command += ["--max_steps", "2", "--save_strategy", "no"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "GSPO" in (out / "README.md").read_text()
    assert not list(out.glob("checkpoint-*"))


# --- bad input: fails before training, naming the culprit ------------------------------------------------------------


@pytest.fixture
def no_trainer(monkeypatch):
    """Make building the trainer an error: the checks under test must fire before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer was built: the input check came too late")

    monkeypatch.setattr(cli, "GSPOTrainer", refuse)


@pytest.mark.parametrize(
    ("overrides", "error", "fragments"),
    [
        ({"dataset_name": "{tmp}/missing.jsonl"}, FileNotFoundError, ["missing.jsonl"]),
        ({"prompt_column": "question"}, ValueError, ["question", "'prompt'", "'answer'"]),
        ({"answer_column": "solution"}, ValueError, ["solution", "'prompt'", "'answer'"]),
        ({"reward_funcs": ["no_such_reward"]}, ValueError, ["no_such_reward", "math_accuracy", "exact_match"]),
        ({"reward_funcs": ["math_accuracy"], "answer_column": None}, ValueError, ["math_accuracy", "answer_column"]),
        ({"model_name_or_path": "{tmp}/no-such-model"}, FileNotFoundError, ["no-such-model"]),
        ({"model_name_or_path": "no-such-org/no-such-model"}, ValueError, ["no-such-org/no-such-model"]),
        ({"resume": True}, FileNotFoundError, ["resume", "checkpoint"]),
        ({"resume_from_checkpoint": "{tmp}/checkpoint-9"}, FileNotFoundError, ["checkpoint-9"]),
    ],
    ids=[
        "missing-data-file",
        "missing-prompt-column",
        "missing-answer-column",
        "unknown-reward",
        "reward-needs-answers",
        "missing-model-folder",
        "unknown-hub-model",
        "resume-without-checkpoint",
        "missing-resume-folder",
    ],
)
def test_bad_input_fails_before_training(assets, tmp_path, no_trainer, overrides, error, fragments):
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    recipe = write_recipe(assets, tmp_path, **overrides)
    with pytest.raises(error) as raised:
        run(recipe)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("reward", "error", "fragments"),
    [
        ("raising_reward", RuntimeError, ["raising_reward", "KeyError", "no such field"]),
        ("nan_reward", ValueError, ["nan_reward", "max_consecutive_nonfinite_reward_rollouts=1"]),
    ],
)
def test_failing_reward_is_named(assets, tmp_path, reward, error, fragments):
    """A crash stops at once; NaN everywhere stops after max_consecutive_nonfinite_reward_rollouts rollouts."""
    recipe = write_recipe(
        assets,
        tmp_path,
        reward_funcs=[f"{REWARD_MODULE}.{reward}"],
        max_steps=1,
        max_consecutive_nonfinite_reward_rollouts=1,
    )
    with pytest.raises(error) as raised:
        run(recipe)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in: {raised.value}"


# --- the run folder, and resuming a finished run ---------------------------------------------------------------------


def test_run_folder_holds_trainer_state_for_plot_run(uninterrupted):
    """Every run leaves trainer_state.json (all logged metrics) in output_dir, whatever its save_strategy."""
    state = json.loads((uninterrupted.out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert {entry["step"] for entry in state["log_history"] if "loss" in entry} == {1, 2, 3, 4}


def test_resuming_a_finished_run_changes_nothing(assets, uninterrupted, tmp_path, capsys):
    """--resume true on a run that reached max_steps says it is complete and trains nothing (it used to train one
    step past max_steps and overwrite the final model)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(uninterrupted.out, out)
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    recipe = write_recipe(assets, tmp_path)
    assert cli.main(["--config", str(recipe), "--output_dir", str(out), "--resume", "true"]) is None
    assert "the run is complete" in capsys.readouterr().out
    after = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert after == before
    # a larger max_steps is not complete: the same checkpoint would be resumed
    assert cli.finished_run_message(str(out / "checkpoint-4"), max_steps=6) is None
    assert "step 4 of max_steps=4" in cli.finished_run_message(str(out / "checkpoint-4"), max_steps=4)
