"""The command line as a new user meets it: bad configuration and missing files give one `error: ...` line and
exit status 2 (a failure once training runs keeps its traceback), no argument prefix matching, a recipe's `prepare`
function run before the model loads, and a tiny recipe that builds its own warm-started model and data with it."""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from gspo_examples.tasks import TINY_CACHE_DIR, ensure_task_assets, read_jsonl, tiny_warm_start_name
from gspo_examples.tiny import save_tiny_model
from trl_gspo import cli

ROOT = Path(__file__).resolve().parents[2]
TINY_PREPARE = {"prepare": "gspo_examples.tasks:prepare_tiny_recipe", "prepare_kwargs": {"task": "sort_digits"}}
ROWS = [{"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(16)]
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return {"model": save_tiny_model(root / "model", hidden_size=32), "data": str(data), "root": root}


def write_recipe(assets, folder: Path, **overrides) -> Path:
    recipe = dict(
        model_name_or_path=assets["model"],
        dataset_name=assets["data"],
        answer_column="answer",
        reward_funcs=["exact_match"],
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        max_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        output_dir=str(folder / "out"),
    )
    recipe.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def error_line(capsys, argv) -> str:
    """Run the command line in-process; assert exit status 2 and one clean line on stderr; return that line."""
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing-recipe", ["no-such-recipe.yaml", "no such recipe file"]),
        ("unknown-recipe-key", ["recipe.yaml", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"]),
        ("bad-value", ["epsilon=2.0", "(0, 1)"]),
        ("missing-data-file", ["missing.jsonl", "no such file"]),
        ("missing-model-folder", ["no-such-model", "no such model folder"]),
        ("broken-yaml", ["recipe.yaml"]),
        ("bad-json-override", ["Expecting"]),
        ("bad-value-type", ["--epsilon", "invalid float value: 'abc'", "--help"]),
        ("empty-data-file", ["empty.jsonl", "the file is empty"]),
        ("blank-data-file", ["blank.jsonl", "the file is empty"]),
        ("header-only-csv", ["header.csv", "holds no rows"]),
        ("zero-samples", ["max_train_samples=0", "keeps no training rows", "16 rows"]),
        ("num-generations", ["num_generations=3", "per_device_train_batch_size=8", "divides 32"]),
        ("one-generation", ["num_generations=1", ">= 2", "group"]),
        ("no-completion-tokens", ["max_completion_length=0", "positive number of tokens"]),
        ("greedy-temperature", ["temperature=0.0", "> 0"]),
        ("no-steps-per-rollout", ["steps_per_generation=0", "positive integer"]),
        ("negative-learning-rate", ["learning_rate=-1.0", ">= 0"]),
        ("non-utf8-data-file", ["latin1.jsonl", "line 2 is not UTF-8", "b'\\xe9'"]),
        ("empty-model-folder", ["empty-model", "without config.json"]),
        ("model-without-weights", ["no-weights", "has a config.json but no weights", "model.safetensors"]),
        pytest.param(
            "vllm-not-installed",
            ["use_vllm=True", "vLLM is not installed", "pip install 'vllm"],
            marks=pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here"),
        ),
    ],
)
def test_bad_configuration_is_one_error_line(assets, tmp_path, capsys, case, fragments):
    recipe = write_recipe(assets, tmp_path)
    argv = ["--config", str(recipe)]
    if case == "missing-recipe":
        argv = ["--config", str(tmp_path / "no-such-recipe.yaml")]
    elif case == "unknown-recipe-key":
        write_recipe(assets, tmp_path, learning_rat=1e-5)
    elif case == "bad-value":
        write_recipe(assets, tmp_path, epsilon=2.0)
    elif case == "missing-data-file":
        write_recipe(assets, tmp_path, dataset_name=str(tmp_path / "missing.jsonl"))
    elif case == "missing-model-folder":
        write_recipe(assets, tmp_path, model_name_or_path=str(tmp_path / "no-such-model"))
    elif case == "broken-yaml":
        recipe.write_text("epsilon: [unclosed\n")
    elif case == "bad-json-override":
        argv += ["--reward_kwargs", "{not json"]
    elif case == "bad-value-type":
        argv += ["--epsilon", "abc"]
    elif case in ("empty-data-file", "blank-data-file", "header-only-csv"):
        name, text = {"empty-data-file": ("empty.jsonl", ""), "blank-data-file": ("blank.jsonl", "\n\n")}.get(
            case, ("header.csv", "prompt,answer\n")
        )
        (tmp_path / name).write_text(text)
        write_recipe(assets, tmp_path, dataset_name=str(tmp_path / name))
    elif case == "zero-samples":
        write_recipe(assets, tmp_path, max_train_samples=0)
    elif case == "num-generations":
        write_recipe(assets, tmp_path, num_generations=3)
    elif case in CONFIG_OVERRIDES:
        write_recipe(assets, tmp_path, **CONFIG_OVERRIDES[case])
    elif case == "non-utf8-data-file":
        (tmp_path / "latin1.jsonl").write_bytes(
            json.dumps(ROWS[0]).encode() + b"\n" + '{"prompt": "caf\u00e9", "answer": "1"}\n'.encode("latin-1")
        )
        write_recipe(assets, tmp_path, dataset_name=str(tmp_path / "latin1.jsonl"))
    elif case == "empty-model-folder":
        (tmp_path / "empty-model").mkdir()
        write_recipe(assets, tmp_path, model_name_or_path=str(tmp_path / "empty-model"))
    elif case == "model-without-weights":
        shutil.copytree(assets["model"], tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
        write_recipe(assets, tmp_path, model_name_or_path=str(tmp_path / "no-weights"))
    elif case == "vllm-not-installed":
        write_recipe(assets, tmp_path, use_vllm=True)
    line = error_line(capsys, argv)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    # names the user never wrote, a library's advice, a file that is not there, a command of this repository
    for internal in ("_gspo_", "generation_batch_size", "Instruction", "fail_with_unknown_args", "max_new_tokens"):
        assert internal not in line, line
    assert "model_type" not in line and "make " not in line, line
    assert not (tmp_path / "out").exists()


# Cases of test_bad_configuration_is_one_error_line that are one recipe value each
CONFIG_OVERRIDES = {
    "one-generation": {"num_generations": 1},
    "no-completion-tokens": {"max_completion_length": 0},
    "greedy-temperature": {"temperature": 0.0},
    "no-steps-per-rollout": {"steps_per_generation": 0},
    "negative-learning-rate": {"learning_rate": -1.0},
}


@pytest.fixture
def no_trainer(monkeypatch):
    """Building the trainer (which loads the model) is an error: the checks under test must fire before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer was built: the input check came too late")

    monkeypatch.setattr(cli, "GSPOTrainer", refuse)


@pytest.mark.parametrize("inside", [False, True])
def test_output_dir_naming_a_file_is_one_error_line_before_the_model_loads(
    assets, tmp_path, capsys, no_trainer, inside
):
    existing = tmp_path / "notes.txt"
    existing.write_text("not a run folder")
    output_dir = existing / "run" if inside else existing
    recipe = write_recipe(assets, tmp_path, output_dir=str(output_dir))
    line = error_line(capsys, ["--config", str(recipe)])
    assert f"output_dir={str(output_dir)!r}" in line
    assert ("inside" in line) == inside and "is a file" in line
    assert existing.read_text() == "not a run folder"


def test_default_reward_without_math_verify_is_one_error_line(assets, tmp_path, capsys, monkeypatch, no_trainer):
    """math_accuracy (the default reward) without its optional extra: said before the model loads."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    recipe = write_recipe(assets, tmp_path, reward_funcs=["math_accuracy"])
    line = error_line(capsys, ["--config", str(recipe)])
    assert "math_accuracy needs the math-verify package" in line and "'trl-gspo[math]'" in line


def test_a_run_shows_a_progress_bar_and_one_line_summaries_not_metric_dicts(assets, tmp_path, capsys):
    recipe = write_recipe(assets, tmp_path, max_steps=2, logging_steps=1, steps_per_generation=2)
    cli.main(["--config", str(recipe)])
    captured = capsys.readouterr()
    summaries = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in summaries] == ["step 1/2", "step 2/2"], captured.out
    assert all("reward " in line and "clipped sequences " in line and "s_i - 1 in [" in line for line in summaries)
    assert "{'loss'" not in captured.out and "'train_runtime'" not in captured.out, captured.out
    assert "2/2" in captured.err  # the bar


def test_summary_lines_are_periodic():
    callback = cli.SummaryProgressCallback()
    callback.training_bar = type("Bar", (), {"write": lambda self, line: written.append(line)})()
    written = []
    state = type("State", (), {"is_world_process_zero": True, "max_steps": 1000})()
    for step in range(4, 1001, 4):  # a tiny recipe: a log every 4 steps
        state.global_step = step
        callback.on_log(None, state, None, logs={"reward": 0.5, "loss": 0.0})
    assert len(written) == 20 and written[0].startswith("step 4/1000: reward 0.500")
    assert written[1].startswith("step 56/1000")  # >= 50 steps after the previous line


def test_argument_prefixes_are_not_expanded(assets, tmp_path, capsys):
    """`--learning_rat` is a typo, not `--learning_rate` (argparse's allow_abbrev is off)."""
    recipe = write_recipe(assets, tmp_path)
    line = error_line(capsys, ["--config", str(recipe), "--learning_rat", "1e-5"])
    assert "unknown option --learning_rat (did you mean --learning_rate?)" in line
    _, training_args, _ = cli.parse_args(["--config", str(recipe), "--learning_rate", "1e-5"])
    assert training_args.learning_rate == 1e-5


def test_failure_during_training_keeps_its_traceback(assets, tmp_path, monkeypatch):
    """Only input errors are shortened: an exception once training runs propagates as is."""
    module = tmp_path / "crashing_reward_module.py"
    module.write_text("def crash(completions, **kwargs):\n    raise KeyError('bug in the reward')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write_recipe(assets, tmp_path, reward_funcs=["crashing_reward_module.crash"])
    with pytest.raises(RuntimeError, match="bug in the reward"):
        cli.main(["--config", str(recipe)])


def test_script_prints_one_line_without_traceback(tmp_path):
    """The real entry point, in a subprocess: exit status 2, one stderr line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_gspo.py"), "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --config {tmp_path / 'missing.yaml'}: no such recipe file."], result.stderr


def test_tiny_task_assets_are_built_when_missing_then_found(tmp_path):
    messages = []
    model_path, data_path = tmp_path / "cache" / "sort_digits-warm-start", tmp_path / "data" / "train.jsonl"
    built = ensure_task_assets("sort_digits", model_path, data_path, seed=0, log=messages.append)
    assert (built / "warm_start.json").is_file() and (built / "model.safetensors").is_file()
    assert built.parent == model_path.parent and not model_path.exists()
    rows = read_jsonl(data_path)
    assert len(rows) == 4000 and rows[0]["prompt"][0]["content"].startswith("sort ")
    assert any("dataset_name" in m and "was missing" in m for m in messages)
    assert any("does not exist: built it" in m for m in messages)

    messages.clear()
    assert ensure_task_assets("sort_digits", model_path, data_path, seed=0, log=messages.append) == built
    assert len(messages) == 2 and "found it in the cache" in messages[-1]  # the cache line and this one
    assert ensure_task_assets("sort_digits", built, data_path, log=messages.append) == built  # an existing folder


def test_tiny_recipe_with_a_mistyped_model_path_builds_nothing(assets, tmp_path, capsys, no_trainer):
    """A missing model is built only at a path named `<task>-warm-start` (the recipe's own form): any other missing
    path, e.g. a typo, is an error naming it, and no model is written there or next to it."""
    typo = tmp_path / "models" / "my-sort-modle"
    recipe = write_recipe(assets, tmp_path, **TINY_PREPARE, model_name_or_path=str(typo))
    line = error_line(capsys, ["--config", str(recipe)])
    assert f"model_name_or_path={str(typo)!r}: no such model folder" in line and "'sort_digits-warm-start'" in line
    assert not (tmp_path / "models").exists()


def test_tiny_recipe_with_a_mistyped_dataset_name_writes_nothing(assets, tmp_path, capsys, no_trainer):
    """The task's data is written only to a file named `train.jsonl` (the recipe's form): a mistyped dataset_name is
    an error naming it, and no data is written there to train on."""
    typo = tmp_path / "data" / "trian.jsonl"
    recipe = write_recipe(assets, tmp_path, **TINY_PREPARE, dataset_name=str(typo))
    line = error_line(capsys, ["--config", str(recipe)])
    assert f"dataset_name={str(typo)!r}: no such file" in line and "'train.jsonl'" in line
    assert not (tmp_path / "data").exists()


def test_a_run_and_its_resume_show_no_deprecation_or_missing_keys_noise(assets, tmp_path, capsys):
    """transformers 5 deprecated `gradient_checkpointing` (GRPOConfig's default sits on that name, and TRL calls the
    deprecated model methods); resuming a tied-embedding model made transformers report the tied `lm_head.weight`
    as missing. Neither reaches the user; the resume says what the checkpoint lacks and why that is fine."""
    notices = []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    recipe = write_recipe(assets, tmp_path, max_steps=1, save_strategy="steps", save_steps=1, disable_tqdm=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli.main(["--config", str(recipe)])
            cli.main(["--config", str(recipe), "--max_steps", "2", "--resume", "true"])
    finally:
        trainer_logger.removeHandler(handler)
    deprecations = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert deprecations == []
    assert not any("missing keys" in notice for notice in notices), notices
    tied = [notice for notice in notices if "lm_head.weight" in notice]
    assert tied == [
        "the checkpoint does not store lm_head.weight (tied to model.embed_tokens.weight, restored with "
        "it): nothing is missing."
    ]
    assert "checkpointing" not in capsys.readouterr().err


def test_tiny_recipes_have_their_own_run_folders_and_the_documented_model_path():
    """A standalone tiny recipe run must not overwrite the demo's run folder (runs/demo/<task>, `make demo`)."""
    recipes = sorted((ROOT / "recipes" / "tiny").glob("*/gspo.yaml"))
    assert len(recipes) == 3
    for path in recipes:
        recipe = yaml.safe_load(path.read_text())
        assert recipe["prepare"] == TINY_PREPARE["prepare"]
        task = recipe["prepare_kwargs"]["task"]
        for key in ("output_dir", "dataset_name"):
            assert not Path(recipe[key]).is_relative_to("runs/demo"), f"{path}: {key}={recipe[key]}"
        assert Path(recipe["output_dir"]) == Path("runs/tiny") / task
        assert recipe["model_name_or_path"] == f"{TINY_CACHE_DIR}/{tiny_warm_start_name(task)}"


def test_unknown_task_of_the_tiny_recipe_is_refused(assets, tmp_path, capsys):
    recipe = write_recipe(assets, tmp_path, prepare=TINY_PREPARE["prepare"], prepare_kwargs={"task": "sort_letters"})
    line = error_line(capsys, ["--config", str(recipe)])
    assert "task='sort_letters'" in line and "sort_digits" in line


PREPARE_CALLS = []


def record_prepare(script_args, training_args, model_args, *, model):
    """A `prepare` function loaded by the CLI by its dotted name (the tests folder is on sys.path)."""
    PREPARE_CALLS.append((type(script_args).__name__, type(training_args).__name__, model_args.model_name_or_path))
    model_args.model_name_or_path = model


NOT_CALLABLE = 42


def test_prepare_runs_before_the_model_loads_and_may_point_the_run_at_its_inputs(assets, tmp_path, monkeypatch):
    """The recipe's model path does not exist; the prepare function, called with the three argument objects and
    prepare_kwargs, points the run at a real model, which the checks then accept."""
    PREPARE_CALLS.clear()
    recipe = write_recipe(
        assets,
        tmp_path,
        model_name_or_path=str(tmp_path / "not-built-yet"),
        prepare="test_cli_usability:record_prepare",
        prepare_kwargs={"model": assets["model"]},
    )
    inputs = cli.check_inputs(*cli.parse_args(["--config", str(recipe)]))
    assert PREPARE_CALLS == [("GSPOScriptArguments", "GSPOConfig", str(tmp_path / "not-built-yet"))]
    assert len(inputs.train_dataset) == len(ROWS)


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            {"prepare": "no_such_package.tasks:prepare"},
            ["prepare='no_such_package.tasks:prepare'", "cannot be imported"],
        ),
        ({"prepare": "test_cli_usability:no_such_function"}, ["no_such_function", "cannot be imported"]),
        (
            {"prepare": "test_cli_usability:NOT_CALLABLE"},
            ["prepare='test_cli_usability:NOT_CALLABLE'", "not a function"],
        ),
        ({"prepare": "prepare_tiny_recipe"}, ["prepare='prepare_tiny_recipe'", "package.module:function"]),
        (
            {"prepare": "test_cli_usability:record_prepare", "prepare_kwargs": {"modle": "x"}},
            ["prepare_kwargs={'modle': 'x'}", "do not fit", "record_prepare"],
        ),
        ({"prepare_kwargs": {"task": "add"}}, ["prepare_kwargs={'task': 'add'}", "prepare is not"]),
    ],
)
def test_a_bad_prepare_hook_is_one_error_line_naming_the_field(
    assets, tmp_path, capsys, no_trainer, overrides, fragments
):
    PREPARE_CALLS.clear()
    line = error_line(capsys, ["--config", str(write_recipe(assets, tmp_path, **overrides))])
    assert all(fragment in line for fragment in fragments), line
    assert PREPARE_CALLS == []


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_build_the_tiny_recipe_assets_once(tmp_path):
    """`accelerate launch` with 2 processes and no cache: the main process builds the model and data while the
    other waits (TrainingArguments.main_process_first), then both train on them."""
    cache, data = tmp_path / "cache", tmp_path / "data" / "train.jsonl"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--mixed_precision", "no", "--main_process_port", "0", str(ROOT / "scripts" / "train_gspo.py")]
    command += ["--config", str(ROOT / "recipes" / "tiny" / "sort_digits" / "gspo.yaml")]
    command += ["--model_name_or_path", str(cache / "sort_digits-warm-start"), "--dataset_name", str(data)]
    command += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout
    assert out.count("[rank 0] model_name_or_path=") == 1 and "does not exist: built it" in out, out[-3000:]
    assert out.count("[rank 1] model_name_or_path=") == 1 and "does not exist: found it in the cache" in out
    assert out.count("was missing: wrote the sort_digits train split") == 1  # rank 1 found the file written
    assert "GSPO run: world size 2, backend DDP" in result.stdout
    assert len(list(cache.glob("sort_digits-*/warm_start.json"))) == 1
    assert (tmp_path / "out" / "model.safetensors").is_file()
