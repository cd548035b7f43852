"""Train with GSPO from a YAML recipe plus command-line overrides (`scripts/train_gspo.py`, `trl-gspo-train`).

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml scripts/train_gspo.py \\
        --config recipes/qwen2.5-1.5b/gsm8k/gspo_full.yaml --learning_rate 5e-7

Three dataclasses are parsed by TRL's TrlParser: `GSPOScriptArguments` (data and rewards), `GSPOConfig`
(every GRPOConfig/TrainingArguments field) and TRL's `ModelConfig` (model, dtype, LoRA/QLoRA). A recipe key
none of them knows is an error. Everything that can be checked before training (output folder, dataset file, rows
and columns, reward names and their optional packages, model path, checkpoint to resume from) is checked before the
model is loaded.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import inspect
import json
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.utils import logging as datasets_logging
from transformers import AutoConfig, ProgressCallback
from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config
from trl.import_utils import is_vllm_available

from . import metrics as names
from .checkpoints import (
    TRAINER_STATE,
    checkpoint_folders,
    checkpoint_problem,
    latest_complete_checkpoint,
    run_outputs,
)
from .config import GSPOConfig
from .rewards import load_reward_funcs, split_import_path, wrap_reward_checked
from .trainer import GSPOTrainer
from .vllm_cpu import VLLM_INSTALL_HINT

LOCAL_DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_DATA_BUILDERS = ("json", "csv")  # read as UTF-8 text
# The files from_pretrained loads a local model's weights from, one (or a sharded index) is required
MODEL_WEIGHTS_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


@dataclass
class GSPOScriptArguments(ScriptArguments):
    """Data and reward arguments of the GSPO training script (plus TRL's ScriptArguments: dataset_name, splits).

    `dataset_name` is a hub dataset name or a local .jsonl/.json/.parquet/.csv file.
    """

    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt (text or messages)."})
    answer_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the reference answer; passed to reward functions as `answer`."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System message prepended to every prompt."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_accuracy"],
        metadata={"help": "Reward functions: names from trl_gspo.rewards.REWARD_FUNCS or dotted import paths."},
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Arguments of reward factories, by name, e.g. {'soft_overlong_penalty': {...}} (or JSON)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    resume: bool = field(
        default=False, metadata={"help": "Resume from the last checkpoint in output_dir (error if there is none)."}
    )
    prepare: str | None = field(
        default=None,
        metadata={
            "help": "A function 'package.module:function' called before the model loads, as function(script_args, "
            "training_args, model_args, **prepare_kwargs) under training_args.main_process_first: it may build "
            "missing inputs and point model_name_or_path / dataset_name at them (the tiny recipes: "
            "gspo_examples.tasks:prepare_tiny_recipe)."
        },
    )
    prepare_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments of the `prepare` function, e.g. {'task': 'sort_digits'}."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that already holds one (checkpoints, a model, trainer_state.json): "
            "its checkpoint-* folders are deleted before training, its other files replaced as the new run writes "
            "them. Without it such a folder is refused unless the run resumes (resume, resume_from_checkpoint)."
        },
    )


def _argument_error(message: str):
    """argparse's error handler, replaced: raise (one `error:` line from `main`) instead of printing the usage."""
    raise ValueError(f"{message} (--help lists every option)")


def parse_args(argv: list[str] | None = None) -> tuple[GSPOScriptArguments, GSPOConfig, ModelConfig]:
    """Parse `--config recipe.yaml` and overrides into (script_args, training_args, model_args)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        recipe = argv[argv.index("--config") + 1]
        if not Path(recipe).is_file():
            raise FileNotFoundError(f"--config {recipe}: no such recipe file.")
    # allow_abbrev=False: argparse would otherwise take a typo such as --learning_rat for --learning_rate
    parser = TrlParser((GSPOScriptArguments, GSPOConfig, ModelConfig), allow_abbrev=False)
    parser.error = _argument_error  # one line, not argparse's usage of every option (over 200 lines)
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as error:
        known = {action.dest for action in parser._actions}
        if "Unknown arguments from config file" in str(error):
            recipe_keys = yaml.safe_load(Path(recipe).read_text())
            unknown = [key for key in recipe_keys if key not in known and key != "env"]  # env: TrlParser's own
            if unknown:
                raise ValueError(f"--config {recipe}: {unknown_names_message(unknown, known, option=False)}") from None
        if "arguments are not used by the HfArgumentParser" in str(error):
            unknown = [arg[2:].split("=")[0] for arg in argv if arg.startswith("--")]
            unknown = [name for name in unknown if name not in known and name != "config"]
            if unknown:
                raise ValueError(unknown_names_message(unknown, known, option=True)) from None
        raise
    for name in ("reward_kwargs", "prepare_kwargs"):  # a dict on the command line comes as JSON text
        if isinstance(getattr(script_args, name), str):
            setattr(script_args, name, json.loads(getattr(script_args, name)))
    return script_args, training_args, model_args


def unknown_names_message(unknown: list[str], known: set[str], option: bool) -> str:
    """`unknown key 'learning_rat' (did you mean 'learning_rate'?)` (a recipe key) or `unknown option --learning_rat
    (did you mean --learning_rate?)` for each name, then where the names come from."""
    kind, shown = ("option", "--{}".format) if option else ("key", repr)
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {shown(close[0])}?)" if close else ""
        described.append(f"unknown {kind} {shown(name)}{hint}")
    return "; ".join(described) + ": each is a field of GSPOScriptArguments, GSPOConfig or trl.ModelConfig."


def load_prompt_dataset(script_args: GSPOScriptArguments, split: str) -> Dataset:
    """Load one split from a hub name or a local file, checked and shaped for GRPOTrainer.

    Returns rows with a conversational `prompt` (system prompt prepended when given) and, when
    `answer_column` is set, an `answer` string column.
    """
    name = script_args.dataset_name
    if not name:
        raise ValueError("dataset_name is required: a hub dataset name or a local .jsonl/.json/.parquet/.csv file.")
    suffix = Path(name).suffix.lower()
    local = suffix in LOCAL_DATA_BUILDERS or Path(name).exists()
    # a local file loads in moments; its progress bars would only push a bad input's one `error:` line down
    with datasets_progress_bars_off() if local else contextlib.nullcontext():
        return _load_prompt_dataset(script_args, split, name, suffix, local)


@contextlib.contextmanager
def datasets_progress_bars_off():
    """`datasets`' progress bars off inside the block, restored after it."""
    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def _load_prompt_dataset(script_args, split: str, name: str, suffix: str, local: bool) -> Dataset:
    if local:
        if not Path(name).is_file():
            raise FileNotFoundError(f"dataset_name={name!r}: no such file.")
        if suffix not in LOCAL_DATA_BUILDERS:
            raise ValueError(f"dataset_name={name!r}: expected one of {sorted(LOCAL_DATA_BUILDERS)} for a local file.")
        dataset = load_local_file(name, LOCAL_DATA_BUILDERS[suffix], split)
    else:
        loaded = load_dataset(name, name=script_args.dataset_config)
        if isinstance(loaded, DatasetDict) and split not in loaded:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(loaded)}.")
        dataset = loaded[split]
    if len(dataset) == 0:
        raise ValueError(f"dataset_name={name!r}: split {split!r} holds no rows.")

    columns = dataset.column_names
    for role, column in (("prompt_column", script_args.prompt_column), ("answer_column", script_args.answer_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{role}={column!r} is not a column of dataset {name!r}; its columns are {columns}.")
    if script_args.max_train_samples is not None:
        if script_args.max_train_samples < 1:
            raise ValueError(
                f"max_train_samples={script_args.max_train_samples} keeps no training rows: give a positive number, "
                f"or leave it unset to train on all {len(dataset)} rows of {name!r}."
            )
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))

    def to_prompt(row):
        prompt = row[script_args.prompt_column]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if script_args.system_prompt:
            messages = [{"role": "system", "content": script_args.system_prompt}, *messages]
        shaped = {"_gspo_prompt": messages}
        if script_args.answer_column is not None:
            shaped["_gspo_answer"] = str(row[script_args.answer_column])
        return shaped

    # New column names, then renamed: `map` keeps a same-named column's old type (a CSV's int answers would stay int)
    dataset = dataset.map(to_prompt, remove_columns=columns).rename_column("_gspo_prompt", "prompt")
    return dataset.rename_column("_gspo_answer", "answer") if script_args.answer_column is not None else dataset


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as file:
        while chunk := file.read(1 << 16):
            if chunk.strip():
                return False
    return True


def check_utf8(name: str) -> None:
    """Fail naming the file and line if a text data file is not UTF-8 (`datasets` reads it, and the bad bytes fail
    later, naming neither)."""
    with open(name, "rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"dataset_name={name!r}: line {number} is not UTF-8 text (byte {line[error.start : error.end]!r} at "
                    f"position {error.start} of the line: {error.reason}); save the file as UTF-8."
                ) from None


def load_local_file(name: str, builder: str, split: str) -> Dataset:
    """Load a local data file as `split`, with an error naming the file for one that is empty or holds no rows
    (`datasets` raises a bare StopIteration for an empty .jsonl, and names neither file nor cause for a header-only
    .csv)."""
    if _is_blank(Path(name)):
        raise ValueError(f"dataset_name={name!r}: the file is empty; it needs one row per prompt.")
    if builder in TEXT_DATA_BUILDERS:
        check_utf8(name)
    try:
        return load_dataset(builder, data_files={split: name}, split=split)
    except StopIteration:
        raise ValueError(f"dataset_name={name!r}: the file holds no rows.") from None
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise ValueError(
            f"dataset_name={name!r} cannot be read as {builder}: {type(cause).__name__}: {cause}"
        ) from None
    except ValueError as error:
        if "corresponds to no data" in str(error):
            raise ValueError(f"dataset_name={name!r}: the file holds no rows (only a header?).") from None
        raise ValueError(f"dataset_name={name!r}: {error}") from None


def build_reward_funcs(script_args: GSPOScriptArguments):
    """Resolve the reward names, each wrapped so that a crash or a malformed output names the reward function."""
    reward_kwargs = script_args.reward_kwargs or {}
    unknown = set(reward_kwargs) - set(script_args.reward_funcs)
    if unknown:
        raise ValueError(
            f"reward_kwargs names {sorted(unknown)}, which are not in reward_funcs {script_args.reward_funcs}."
        )
    specs = [{"name": n, "kwargs": reward_kwargs[n]} if n in reward_kwargs else n for n in script_args.reward_funcs]
    funcs = [wrap_reward_checked(func) for func in load_reward_funcs(specs)]
    if not script_args.answer_column:
        for func in funcs:
            if "answer" in inspect.signature(getattr(func, "__wrapped__", func)).parameters:
                raise ValueError(f"reward {func.__name__!r} needs reference answers: set answer_column.")
    return funcs


def check_model_path(model_name_or_path: str | None, revision: str | None = None, trust_remote_code=False) -> None:
    """Fail before training if the model cannot be resolved (local folder or hub name)."""
    if not model_name_or_path:
        raise ValueError("model_name_or_path is required (a local folder or a hub model name).")
    looks_local = model_name_or_path.startswith((".", "/", "~")) or model_name_or_path.count("/") > 1
    folder = Path(model_name_or_path).expanduser()
    if looks_local and not folder.is_dir():
        raise FileNotFoundError(f"model_name_or_path={model_name_or_path!r}: no such model folder.")
    if folder.is_dir() and not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"model_name_or_path={model_name_or_path!r} is a folder without {CONFIG_NAME}: not a saved model "
            f"(save_pretrained writes {CONFIG_NAME} and the weights)."
        )
    try:
        AutoConfig.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        where = (
            f"its {CONFIG_NAME} cannot be read"
            if folder.is_dir()
            else "neither a model folder nor a reachable hub model"
        )
        raise ValueError(f"model_name_or_path={model_name_or_path!r}: {where}: {error}") from error
    if folder.is_dir() and not any((folder / name).is_file() for name in MODEL_WEIGHTS_FILES):
        raise FileNotFoundError(
            f"model_name_or_path={model_name_or_path!r} has a {CONFIG_NAME} but no weights: expected one of "
            f"{', '.join(MODEL_WEIGHTS_FILES)} (was the model saved completely?)."
        )


def check_output_dir(output_dir: str) -> None:
    """Fail before the model loads if `output_dir`, or a folder above it, is an existing file."""
    path = Path(output_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "is a file" if candidate == path else f"lies inside {str(candidate)!r}, which is a file"
                raise NotADirectoryError(f"output_dir={output_dir!r} {what}, not a folder: choose another output_dir.")
            return


def resume_checkpoint(training_args: GSPOConfig, resume: bool, overwrite_output_dir: bool = False) -> str | None:
    """The checkpoint to resume from: an explicit resume_from_checkpoint, the newest complete one in output_dir
    (`resume`, trl_gspo/checkpoints.py says what counts), or None for a new run (`_start_in`). The main process
    prints which checkpoint it resumes from, and each newer one it passes over."""
    output_dir, explicit = training_args.output_dir, training_args.resume_from_checkpoint
    main_process = training_args.process_index == 0
    if resume and overwrite_output_dir:
        raise ValueError(
            "resume=True continues the run in output_dir, overwrite_output_dir=True replaces it: choose one."
        )
    skipped = []
    if explicit:
        if not Path(explicit).is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint={explicit!r}: no such folder.")
        if problem := checkpoint_problem(explicit, require_mark=False):
            raise ValueError(f"resume_from_checkpoint={explicit!r} cannot be resumed from: {problem}.")
        if Path(explicit).resolve().parent != Path(output_dir).resolve():  # continued in another run's folder
            _start_in(output_dir, overwrite_output_dir, main_process)
        checkpoint = explicit
    elif resume:
        latest, skipped = latest_complete_checkpoint(output_dir)
        if latest is None and not skipped:
            raise FileNotFoundError(f"resume=True but output_dir={output_dir!r} holds no checkpoint-* folder.")
        if latest is None:
            by_problem = {}  # checkpoints with the same problem, named together
            for folder, problem in skipped:
                by_problem.setdefault(problem, []).append(folder.name)
            reasons = "; ".join(f"{', '.join(names)}: {problem}" for problem, names in by_problem.items())
            raise ValueError(
                f"resume=True but no checkpoint in output_dir={output_dir!r} is complete ({reasons}). A checkpoint "
                "written before checkpoints were marked can be named with --resume_from_checkpoint (its files are "
                "checked); or start over with --overwrite_output_dir true, or in another output_dir."
            )
        checkpoint = str(latest)
    else:
        _start_in(output_dir, overwrite_output_dir, main_process)
        return None
    if main_process:
        for folder, problem in skipped:
            print(f"skipping {folder}: {problem}", flush=True)
        if finished_run_message(checkpoint, training_args.max_steps) is None:
            step, last_step = checkpoint_progress(checkpoint, training_args.max_steps)
            print(f"resuming from {checkpoint} (step {step} of {last_step})", flush=True)
    return checkpoint


def _start_in(output_dir: str, overwrite_output_dir: bool, main_process: bool) -> None:
    """Refuse a new run into an output_dir holding an earlier one; with overwrite_output_dir delete its checkpoints
    (here, once every other input has been checked, so that `--resume` can never take them for this run's)."""
    earlier = run_outputs(output_dir)
    if not earlier:
        return
    if not overwrite_output_dir:
        shown = ", ".join(earlier[:6]) + (f" and {len(earlier) - 6} more" if len(earlier) > 6 else "")
        raise ValueError(
            f"output_dir={output_dir!r} already holds a run ({shown}); a new run would overwrite it. Continue it "
            "with --resume true, replace it with --overwrite_output_dir true, or choose another output_dir."
        )
    if main_process:
        deleted = [folder.name for folder in reversed(checkpoint_folders(output_dir))]
        for name in deleted:
            shutil.rmtree(Path(output_dir) / name)
        if deleted:
            print(f"overwrite_output_dir: deleted the earlier run's {', '.join(deleted)} in {output_dir}", flush=True)


def save_final_model(trainer: GSPOTrainer, output_dir: str) -> None:
    """Write the final model next to its checkpoints only once complete: save to a staging folder, then move in.

    Every rank saves into the same staging folder (sharded weights need them all); the main rank moves it in.
    """
    accelerator = trainer.accelerator
    staging = Path(output_dir) / ".final-model-incomplete"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    if trainer.is_fsdp_enabled:  # Trainer.save_model writes weights only from a full state dict under FSDP
        accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for item in staging.iterdir():
            os.replace(item, Path(output_dir) / item.name)
        staging.rmdir()


def run_prepare(script_args, training_args, model_args) -> None:
    """Call the recipe's `prepare` function (see GSPOScriptArguments.prepare). Under `accelerate launch` the main
    process runs it first while the others wait, then they run it and find what it built."""
    path, kwargs = script_args.prepare, script_args.prepare_kwargs or {}
    if not path:
        if kwargs:
            raise ValueError(f"prepare_kwargs={kwargs} is set but prepare is not: name the function they are for.")
        return
    parts = split_import_path(path)
    if parts is None:
        raise ValueError(f"prepare={path!r}: expected 'package.module:function'.")
    try:
        prepare = getattr(importlib.import_module(parts[0]), parts[1])
    except (ImportError, AttributeError) as error:
        raise ValueError(f"prepare={path!r} cannot be imported: {type(error).__name__}: {error}") from None
    if not callable(prepare):
        raise ValueError(f"prepare={path!r} is a {type(prepare).__name__}, not a function.")
    try:
        inspect.signature(prepare).bind(script_args, training_args, model_args, **kwargs)
    except TypeError as error:
        raise ValueError(f"prepare_kwargs={kwargs} do not fit prepare={path!r}: {error}") from None
    with training_args.main_process_first(desc=f"prepare={path}"):
        prepare(script_args, training_args, model_args, **kwargs)


@dataclass
class CheckedInputs:
    """Everything `check_inputs` resolved before the model is loaded."""

    train_dataset: Dataset
    eval_dataset: Dataset | None
    reward_funcs: list
    checkpoint: str | None
    finished: str | None = None  # set when the checkpoint to resume already ends the run: what to tell the user


def checkpoint_progress(checkpoint: str, max_steps: int) -> tuple[int, int]:
    """(the step `checkpoint` is at, the run's last step): `max_steps` when it is set (> 0), else the `max_steps` the
    checkpointed run computed from its epochs."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    return state.get("global_step", 0), max_steps if max_steps > 0 else state.get("max_steps", 0)


def finished_run_message(checkpoint: str | None, max_steps: int) -> str | None:
    """A message saying the run is complete if `checkpoint` already reached the run's last step, else None.

    Resuming such a checkpoint would otherwise train one step past the end and overwrite the model.
    """
    if checkpoint is None or not (Path(checkpoint) / TRAINER_STATE).is_file():
        return None
    step, last_step = checkpoint_progress(checkpoint, max_steps)
    if last_step <= 0 or step < last_step:
        return None
    return (
        f"the run is complete: {checkpoint} is at step {step} of max_steps={last_step}; nothing "
        "to resume, nothing was changed (raise --max_steps to train further)."
    )


def check_inputs(script_args, training_args, model_args) -> CheckedInputs:
    """Check (and, with a `prepare` function, build) every input before the model is loaded; raise naming the
    culprit."""
    check_output_dir(training_args.output_dir)
    if training_args.use_vllm and not is_vllm_available():
        raise ValueError(f"use_vllm=True, but vLLM is not installed: {VLLM_INSTALL_HINT}.")
    run_prepare(script_args, training_args, model_args)
    check_model_path(model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code)
    train_dataset = load_prompt_dataset(script_args, script_args.dataset_train_split)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_prompt_dataset(script_args, script_args.dataset_test_split)
    reward_funcs = build_reward_funcs(script_args)
    checkpoint = resume_checkpoint(training_args, script_args.resume, script_args.overwrite_output_dir)
    finished = finished_run_message(checkpoint, training_args.max_steps)
    return CheckedInputs(train_dataset, eval_dataset, reward_funcs, checkpoint, finished)


# transformers 5 deprecated these model methods; TRL 1.16 still calls them around every generation, and each call
# warns. Nothing in a recipe causes or can avoid them.
TRL_DEPRECATED_CALLS = r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is"
MISSING_KEYS_NOTICE = "There were missing keys in the checkpoint model loaded: "


class TiedWeightsNotice(logging.Filter):
    """transformers' resume warning "missing keys ... ['lm_head.weight']" for a model whose output layer is tied to
    its input embeddings (checkpoints store the shared tensor once): replaced by a line saying that nothing is
    missing. Any other missing key keeps the warning as it is."""

    def __init__(self, tied: dict[str, str]):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(MISSING_KEYS_NOTICE):
            missing = ast.literal_eval(message[len(MISSING_KEYS_NOTICE) :].rstrip("."))
            if missing and all(key in self.tied for key in missing):
                tied = ", ".join(f"{key} (tied to {self.tied[key]}, restored with it)" for key in missing)
                record.msg = f"the checkpoint does not store {tied}: nothing is missing."
                record.args = ()
        return True


@contextlib.contextmanager
def benign_library_notices_explained(model):
    """Inside the block: TRL's calls of deprecated transformers methods do not warn (TRL_DEPRECATED_CALLS), and a
    resume of a tied-embedding model says why its checkpoint lacks the output layer (TiedWeightsNotice)."""
    trainer_logger = logging.getLogger("transformers.trainer")
    tied_notice = TiedWeightsNotice(dict(getattr(model, "all_tied_weights_keys", None) or {}))
    trainer_logger.addFilter(tied_notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TRL_DEPRECATED_CALLS, category=FutureWarning)
            yield
    finally:
        trainer_logger.removeFilter(tied_notice)


def train(script_args, training_args, model_args, callbacks=None, inputs: CheckedInputs | None = None):
    """Check every input (unless `inputs` holds them already), then train with GSPOTrainer, save the model,
    its card and trainer_state.json, and return the trainer; None, having trained nothing, when the checkpoint to
    resume already completed the run."""
    inputs = inputs or check_inputs(script_args, training_args, model_args)
    if inputs.finished:
        if training_args.process_index == 0:
            print(inputs.finished)
        return None

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = GSPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=inputs.reward_funcs,
        args=training_args,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        callbacks=callbacks,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if any(isinstance(callback, ProgressCallback) for callback in callbacks or ()):
        # a caller's own progress bar (the demo's compact one) replaces the default one, which prints every log
        trainer.callback_handler.callbacks = [
            c for c in trainer.callback_handler.callbacks if type(c) is not ProgressCallback
        ]
    with benign_library_notices_explained(trainer.model):
        trainer.train(resume_from_checkpoint=inputs.checkpoint)
    save_final_model(trainer, training_args.output_dir)
    trainer.save_state()  # trainer_state.json in the run folder (every metric logged), for scripts/plot_run.py
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(
            model_name=Path(training_args.output_dir).name,
            dataset_name=None if Path(script_args.dataset_name).exists() else script_args.dataset_name,  # hub only
        )
    trainer.accelerator.print(f"GSPO training done; model and model card saved to {training_args.output_dir}")
    return trainer


# Keys of the one-line progress summary: (log key, label, format)
SUMMARY_KEYS = (
    ("reward", "reward", "{:.3f}"),
    ("reward_std", "std", "{:.3f}"),
    (names.GSPO_CLIP_REGION_MEAN, "clipped sequences", "{:.1%}"),
    (names.CLIPPED_TOKEN_FRACTION, "clipped tokens", "{:.1%}"),
    ("completions/mean_length", "mean length", "{:.1f}"),
    ("loss", "loss", "{:.3g}"),
)
SUMMARY_LINES = 20  # about this many summary lines per run


def summary_line(step: int, max_steps: int, logs: dict) -> str:
    """`step N/M: reward 0.512, std 0.301, ..., s_i - 1 in [-3.1e-04, +4.2e-04]`: the logged keys only."""
    parts = [
        f"{label} {fmt.format(logs[key])}"
        for key, label, fmt in SUMMARY_KEYS
        if isinstance(logs.get(key), (int, float)) and not isinstance(logs.get(key), bool)
    ]
    low, high = logs.get("gspo/seq_ratio/min"), logs.get("gspo/seq_ratio/max")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        parts.append(f"s_i - 1 in [{low - 1:+.1e}, {high - 1:+.1e}]")
    return f"step {step}/{max_steps}: " + ", ".join(parts)


class SummaryProgressCallback(ProgressCallback):
    """The progress bar with one summary line (`summary_line`) about every max_steps / SUMMARY_LINES steps, instead
    of the full metric dict at every log. Every metric still goes to trainer_state.json and the report_to loggers.

    A line shows the latest logged value of each key: the rollout metrics (reward, ...) are logged with the first
    optimizer step of each rollout only."""

    def __init__(self):
        super().__init__()
        self.next_summary_step = 0
        self.latest: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or "loss" not in (logs or {}):
            return  # the end-of-training summary and eval logs have no line here
        self.latest.update(logs)
        if state.global_step >= self.next_summary_step:
            self.next_summary_step = state.global_step + max(1, state.max_steps // SUMMARY_LINES)
            self.training_bar.write(summary_line(state.global_step, state.max_steps, self.latest))


# Errors that mean "the configuration or an input file is wrong": the command line prints them as one line.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, yaml.YAMLError)


def main(argv: list[str] | None = None) -> GSPOTrainer | None:
    """Parse, check every input, train. A bad configuration or a missing file exits with status 2 and one
    `error: ...` line on stderr; anything that fails once training has started keeps its traceback. Progress: a bar
    and a periodic one-line summary (SummaryProgressCallback)."""
    try:
        script_args, training_args, model_args = parse_args(argv)
        inputs = check_inputs(script_args, training_args, model_args)
    except INPUT_ERRORS as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, whatever the message holds
        raise SystemExit(2) from None
    callbacks = None if training_args.disable_tqdm else [SummaryProgressCallback()]
    return train(script_args, training_args, model_args, callbacks=callbacks, inputs=inputs)


def train_main() -> None:
    """Console entry point `trl-gspo-train`."""
    main()
