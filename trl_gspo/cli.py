"""Train with GSPO from a YAML recipe plus command-line overrides (`scripts/train_gspo.py`, `trl-gspo-train`).

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml scripts/train_gspo.py \\
        --config recipes/qwen2.5-1.5b/gsm8k/gspo_full.yaml --learning_rate 5e-7

Three dataclasses are parsed by TRL's TrlParser: `GSPOScriptArguments` (data and rewards), `GSPOConfig`
(every GRPOConfig/TrainingArguments field) and TRL's `ModelConfig` (model, dtype, LoRA/QLoRA). A recipe key
none of them knows is an error. Everything that can be checked before training (dataset file and columns,
reward names, model path, checkpoint to resume from) is checked before the model is loaded.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from transformers import AutoConfig
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from .config import GSPOConfig
from .rewards import load_reward_funcs, wrap_reward_checked
from .trainer import GSPOTrainer

LOCAL_DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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


def parse_args(argv: list[str] | None = None) -> tuple[GSPOScriptArguments, GSPOConfig, ModelConfig]:
    """Parse `--config recipe.yaml` and overrides into (script_args, training_args, model_args)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        recipe = argv[argv.index("--config") + 1]
        if not Path(recipe).is_file():
            raise FileNotFoundError(f"--config {recipe}: no such recipe file.")
    parser = TrlParser((GSPOScriptArguments, GSPOConfig, ModelConfig))
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as error:
        if "Unknown arguments from config file" in str(error):
            raise ValueError(
                f"{error}\nA recipe key must be a field of GSPOScriptArguments, GSPOConfig or trl.ModelConfig."
            ) from None
        raise
    if isinstance(script_args.reward_kwargs, str):
        script_args.reward_kwargs = json.loads(script_args.reward_kwargs)
    return script_args, training_args, model_args


def load_prompt_dataset(script_args: GSPOScriptArguments, split: str) -> Dataset:
    """Load one split from a hub name or a local file, checked and shaped for GRPOTrainer.

    Returns rows with a conversational `prompt` (system prompt prepended when given) and, when
    `answer_column` is set, an `answer` string column.
    """
    name = script_args.dataset_name
    if not name:
        raise ValueError("dataset_name is required: a hub dataset name or a local .jsonl/.json/.parquet/.csv file.")
    suffix = Path(name).suffix.lower()
    if suffix in LOCAL_DATA_BUILDERS or Path(name).exists():
        if not Path(name).is_file():
            raise FileNotFoundError(f"dataset_name={name!r}: no such file.")
        if suffix not in LOCAL_DATA_BUILDERS:
            raise ValueError(f"dataset_name={name!r}: expected one of {sorted(LOCAL_DATA_BUILDERS)} for a local file.")
        dataset = load_dataset(LOCAL_DATA_BUILDERS[suffix], data_files={split: name}, split=split)
    else:
        loaded = load_dataset(name, name=script_args.dataset_config)
        if isinstance(loaded, DatasetDict) and split not in loaded:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(loaded)}.")
        dataset = loaded[split]

    columns = dataset.column_names
    for role, column in (("prompt_column", script_args.prompt_column), ("answer_column", script_args.answer_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{role}={column!r} is not a column of dataset {name!r}; its columns are {columns}.")
    if script_args.max_train_samples is not None:
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


def build_reward_funcs(script_args: GSPOScriptArguments):
    """Resolve the reward names, each wrapped so that a crash or a NaN names the reward function."""
    reward_kwargs = script_args.reward_kwargs or {}
    unknown = set(reward_kwargs) - set(script_args.reward_funcs)
    if unknown:
        raise ValueError(
            f"reward_kwargs names {sorted(unknown)}, which are not in reward_funcs {script_args.reward_funcs}."
        )
    specs = [{"name": n, "kwargs": reward_kwargs[n]} if n in reward_kwargs else n for n in script_args.reward_funcs]
    funcs = [wrap_reward_checked(func) for func in load_reward_funcs(specs)]
    for func in funcs:
        if (
            "answer" in inspect.signature(getattr(func, "__wrapped__", func)).parameters
            and not script_args.answer_column
        ):
            raise ValueError(f"reward {func.__name__!r} needs reference answers: set answer_column.")
    return funcs


def check_model_path(model_name_or_path: str | None, revision: str | None = None, trust_remote_code=False) -> None:
    """Fail before training if the model cannot be resolved (local folder or hub name)."""
    if not model_name_or_path:
        raise ValueError("model_name_or_path is required (a local folder or a hub model name).")
    looks_local = model_name_or_path.startswith((".", "/", "~")) or model_name_or_path.count("/") > 1
    if looks_local and not Path(model_name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"model_name_or_path={model_name_or_path!r}: no such model folder.")
    try:
        AutoConfig.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model_name_or_path={model_name_or_path!r} is neither a model folder nor a reachable hub model: {error}"
        ) from error


def resume_checkpoint(training_args: GSPOConfig, resume: bool) -> str | None:
    """The checkpoint to resume from: an explicit resume_from_checkpoint, the last one in output_dir, or None."""
    if training_args.resume_from_checkpoint:
        if not Path(training_args.resume_from_checkpoint).is_dir():
            raise FileNotFoundError(
                f"resume_from_checkpoint={training_args.resume_from_checkpoint!r}: no such folder."
            )
        return training_args.resume_from_checkpoint
    if not resume:
        return None
    last = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
    if last is None:
        raise FileNotFoundError(
            f"resume=True but output_dir={training_args.output_dir!r} holds no checkpoint-* folder."
        )
    return last


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


def train(script_args, training_args, model_args, callbacks=None) -> GSPOTrainer:
    """Check every input, then train with GSPOTrainer, save the model and its card, and return the trainer."""
    check_model_path(model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code)
    train_dataset = load_prompt_dataset(script_args, script_args.dataset_train_split)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_prompt_dataset(script_args, script_args.dataset_test_split)
    reward_funcs = build_reward_funcs(script_args)
    checkpoint = resume_checkpoint(training_args, script_args.resume)

    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = GSPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        quantization_config=quantization_config,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    save_final_model(trainer, training_args.output_dir)
    if trainer.accelerator.is_main_process:
        local_data = Path(script_args.dataset_name).exists()
        trainer.create_model_card(
            model_name=Path(training_args.output_dir).name,
            dataset_name=None if local_data else script_args.dataset_name,
        )
    trainer.accelerator.print(f"GSPO training done; model and model card saved to {training_args.output_dir}")
    return trainer


def main(argv: list[str] | None = None) -> GSPOTrainer:
    script_args, training_args, model_args = parse_args(argv)
    return train(script_args, training_args, model_args)


def train_main() -> None:
    """Console entry point `trl-gspo-train`."""
    main()
