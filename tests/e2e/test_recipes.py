"""Recipes and launch configs: every training recipe parses and is off-policy GSPO; every accelerate config validates.

Fast: no model is loaded. Training recipes are globbed at test time (every `recipes/**/*.yaml` outside
`recipes/accelerate_configs/`), so recipes added later (e.g. under `recipes/tiny/`) are checked too. The accelerate
configs go through accelerate's own launch-argument processing, and the DeepSpeed ones end in a
`deepspeed.runtime.config.DeepSpeedConfig` built from the resolved config.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import copy  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from trl_gspo.cli import build_reward_funcs, parse_args  # noqa: E402
from trl_gspo.config import (  # noqa: E402
    PAPER_EPSILON_HIGH,
    PAPER_EPSILON_LOW,
    GSPOClipRangeWarning,
    GSPOConfig,
    GSPOOnPolicyWarning,
    GSPOPrecisionWarning,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ACCELERATE_CONFIGS = RECIPES / "accelerate_configs"
README = RECIPES / "README.md"
FULL_RECIPE = RECIPES / "qwen2.5-1.5b" / "gsm8k" / "gspo_full.yaml"
# the vLLM forms of a recipe -> (vllm_mode, the recipe they are the vLLM form of)
VLLM_RECIPES = {
    "qwen2.5-1.5b/gsm8k/gspo_full_vllm_colocate.yaml": ("colocate", "qwen2.5-1.5b/gsm8k/gspo_full.yaml"),
    "qwen2.5-1.5b/gsm8k/gspo_full_vllm_server.yaml": ("server", "qwen2.5-1.5b/gsm8k/gspo_full.yaml"),
    "qwen3-30b-a3b/dapo_math/gspo_zero3_vllm_colocate.yaml": ("colocate", "qwen3-30b-a3b/dapo_math/gspo_zero3.yaml"),
    "qwen3-30b-a3b/dapo_math/gspo_zero3_vllm_server.yaml": ("server", "qwen3-30b-a3b/dapo_math/gspo_zero3.yaml"),
}
EXPECTED_RECIPES = (
    "qwen2.5-1.5b/gsm8k/gspo_full.yaml",
    "qwen2.5-1.5b/gsm8k/gspo_lora.yaml",
    "qwen3-30b-a3b/dapo_math/gspo_zero3.yaml",
    *VLLM_RECIPES,
)
GPUS_PER_NODE = 8
EXPECTED_ACCELERATE_CONFIGS = ("ddp", "zero2", "zero3", "zero3_offload", "fsdp2")
DEEPSPEED_EXPECTED = {  # name -> (zero stage, optimizer offload device, parameter offload device)
    "zero2": (2, "none", "none"),
    "zero3": (3, "none", "none"),
    "zero3_offload": (3, "cpu", "cpu"),
}


def _yaml_files(folder: Path) -> list[Path]:
    return sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")])


def training_recipes() -> list[Path]:
    """Every YAML under recipes/ except the accelerate launch configs (and anything below them)."""
    return [p for p in _yaml_files(RECIPES) if ACCELERATE_CONFIGS not in p.parents]


def accelerate_configs() -> list[Path]:
    return sorted(ACCELERATE_CONFIGS.glob("*.yaml"))


def _ids(paths):
    return [str(p.relative_to(RECIPES)) for p in paths]


def parse_recipe(recipe: Path, output_dir, *overrides: str):
    """parse_args on a recipe, with GSPO's on-policy and GRPO-like-clip warnings turned into errors.

    `--use_cpu true`: the recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless
    it is told to run on the CPU. The bf16 precision warning is expected (see recipes/README.md, "Precision").
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSPOPrecisionWarning)
        warnings.simplefilter("error", GSPOOnPolicyWarning)
        warnings.simplefilter("error", GSPOClipRangeWarning)
        return parse_args(["--config", str(recipe), "--output_dir", str(output_dir), "--use_cpu", "true", *overrides])


# --- training recipes ------------------------------------------------------------------------------------------------


def test_expected_recipes_exist():
    found = set(_ids(training_recipes()))
    missing = [name for name in EXPECTED_RECIPES if name not in found]
    assert not missing, f"missing recipes: {missing}"


@pytest.mark.parametrize("recipe", training_recipes(), ids=_ids(training_recipes()))
def test_recipe_parses_as_off_policy_gspo(recipe, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    assert isinstance(raw, dict) and raw, f"{recipe} is not a YAML mapping of recipe keys"
    script_args, args, model_args = parse_recipe(recipe, tmp_path)

    assert isinstance(args, GSPOConfig)
    assert model_args.model_name_or_path, f"{recipe}: model_name_or_path is required"
    assert script_args.dataset_name, f"{recipe}: dataset_name is required"
    # reward names resolve, and rewards that need reference answers have an answer_column
    assert build_reward_funcs(script_args)

    # GSPO unless the recipe explicitly picks another level (an A/B recipe)
    assert args.importance_sampling_level == raw.get("importance_sampling_level", "sequence")
    if args.is_sequence_level:
        # the paper's clip range unless the recipe explicitly sets another one (a GRPO-sized one fails above)
        assert args.epsilon == raw.get("epsilon", PAPER_EPSILON_LOW)
        assert args.epsilon_high == raw.get("epsilon_high", PAPER_EPSILON_HIGH)
        assert args.loss_type == "grpo"
    assert args.beta == raw.get("beta", 0.0)
    # off-policy: several optimizer steps per rollout, otherwise the ratio is 1 and GSPO is GRPO
    assert not args.is_on_policy, f"{recipe} is on-policy: GSPO would equal GRPO"

    assert not args.save_only_model, f"{recipe}: save_only_model=True checkpoints cannot be resumed"


def test_recipe_values(tmp_path):
    """Spot checks of what the recipes promise in their comments."""
    script_args, args, model_args = parse_recipe(FULL_RECIPE, tmp_path)
    assert (script_args.dataset_name, script_args.dataset_config) == ("openai/gsm8k", "main")
    assert (script_args.prompt_column, script_args.answer_column) == ("question", "answer")
    assert "\\boxed{" in script_args.system_prompt
    assert args.steps_per_generation == 4 * args.gradient_accumulation_steps
    assert args.report_to == ["tensorboard"] and not args.use_vllm and args.gradient_checkpointing

    lora = RECIPES / "qwen2.5-1.5b" / "gsm8k" / "gspo_lora.yaml"
    _, lora_args, lora_model = parse_recipe(lora, tmp_path)
    assert lora_model.use_peft and lora_model.lora_r > 0 and "lm_head" not in lora_model.lora_target_modules
    assert lora_args.learning_rate > args.learning_rate
    assert lora_model.lora_dropout == 0.0 and lora_args.disable_dropout  # no noise in the sequence ratio

    moe = RECIPES / "qwen3-30b-a3b" / "dapo_math" / "gspo_zero3.yaml"
    _, moe_args, moe_model = parse_recipe(moe, tmp_path)
    assert moe_model.model_name_or_path == "Qwen/Qwen3-30B-A3B" and moe_model.dtype == "bfloat16"
    assert moe_args.router_aux_loss_coef == 0.001 and moe_args.gradient_checkpointing
    assert moe_args.steps_per_generation == 4 * moe_args.gradient_accumulation_steps


def test_command_line_overrides_recipe(tmp_path):
    _, args, model_args = parse_recipe(
        FULL_RECIPE, tmp_path, "--learning_rate", "5e-7", "--report_to", "none", "--num_generations", "16"
    )
    assert (args.learning_rate, args.report_to, args.num_generations) == (5e-7, [], 16)
    assert args.output_dir == str(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "level", "sequence_level"),
    [
        ((), "sequence", True),
        (("--importance_sampling_level", "sequence_token"), "sequence_token", True),
        (("--importance_sampling_level", "token", "--epsilon", "0.2", "--epsilon_high", "0.27"), "token", False),
    ],
    ids=["gspo", "gspo-token", "grpo"],
)
def test_ab_switch_of_importance_sampling_level(tmp_path, overrides, level, sequence_level):
    """The README's A/B recipe: one key switches GSPO -> GSPO-token -> GRPO, everything else unchanged."""
    _, args, _ = parse_recipe(FULL_RECIPE, tmp_path, *overrides)
    assert args.importance_sampling_level == level and args.is_sequence_level == sequence_level
    assert not args.is_on_policy and args.loss_type == "grpo"


def test_on_policy_override_warns_that_gspo_equals_grpo(tmp_path):
    """The README's note: steps_per_generation == gradient_accumulation_steps makes GSPO == GRPO (and warns)."""
    with warnings.catch_warnings(), pytest.warns(GSPOOnPolicyWarning, match="GSPO equals GRPO"):
        warnings.simplefilter("ignore", GSPOPrecisionWarning)
        _, args, _ = parse_args(
            ["--config", str(FULL_RECIPE), "--output_dir", str(tmp_path), "--use_cpu", "true"]
            + ["--steps_per_generation", "2"]
        )
    assert args.is_on_policy


def test_unknown_recipe_key_is_a_clear_error(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(FULL_RECIPE.read_text() + "\nlearning_rat: 1.0e-6\n")
    with pytest.raises(ValueError, match="learning_rat") as error:
        parse_args(["--config", str(recipe), "--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert "GSPOScriptArguments, GSPOConfig or trl.ModelConfig" in str(error.value)


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("name", sorted(VLLM_RECIPES))
def test_vllm_recipe_is_its_base_recipe_generating_with_vllm(name, tmp_path):
    """Only the generation engine (and the run folder) differs from the base recipe; the forms parse as vLLM runs."""
    mode, base = VLLM_RECIPES[name]
    recipe, base_recipe = (yaml.safe_load((RECIPES / path).read_text()) for path in (name, base))
    differing = {key for key in recipe.keys() | base_recipe.keys() if recipe.get(key) != base_recipe.get(key)}
    assert {key for key in differing if not key.startswith("vllm_")} == {"use_vllm", "output_dir"}
    _, args, _ = parse_recipe(RECIPES / name, tmp_path)
    assert args.use_vllm and args.vllm_mode == mode
    assert args.vllm_importance_sampling_mode.startswith("sequence")  # GSPO refuses the token modes


def shell_commands(text: str, program: str) -> list[list[str]]:
    """Every `program ...` command in `text` (shell lines or `#` comment lines, `\\` continuations joined), as argv
    with a leading VAR=value environment first: ["VAR=value", ..., program, arguments...]."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    pattern = re.compile(rf"^[#`$\s]*((?:\w+=\S+\s+)*){re.escape(program)}\s+(.*)$")
    commands = []
    for line in text.splitlines():
        if match := pattern.match(line):
            commands.append(
                [*match.group(1).split(), program, *shlex.split(match.group(2).split("`")[0], comments=True)]
            )
    return commands


def visible_gpus(command: list[str]) -> set[int]:
    for word in command:
        if word.startswith("CUDA_VISIBLE_DEVICES="):
            return {int(gpu) for gpu in word.split("=", 1)[1].split(",")}
    return set(range(GPUS_PER_NODE))


@pytest.mark.parametrize("name", sorted(n for n, (mode, _) in VLLM_RECIPES.items() if mode == "server"))
def test_server_recipe_commands_fit_the_recipe(name, tmp_path):
    """The header's `trl vllm-serve` and `accelerate launch` commands parse, serve the recipe's model on the port it
    connects to with room for its completions, and split a node's GPUs without sharing one."""
    from accelerate.commands.launch import launch_command_parser
    from trl.scripts.vllm_serve import make_parser

    text = (RECIPES / name).read_text()
    _, args, model_args = parse_recipe(RECIPES / name, tmp_path)
    [serve] = shell_commands(text, "trl vllm-serve")
    [launch] = shell_commands(text, "accelerate launch")

    server_args, extra = make_parser().parse_args_and_config(
        serve[serve.index("trl vllm-serve") + 1 :], return_remaining_strings=True
    )
    assert not extra, f"{name}: trl vllm-serve does not take {extra}"
    assert server_args.model == model_args.model_name_or_path
    assert server_args.port == int(args.vllm_server_base_url.rsplit(":", 1)[1])
    assert server_args.max_model_len >= args.max_completion_length + 512  # and the prompt
    server_gpus = server_args.tensor_parallel_size * server_args.data_parallel_size

    after_launch = launch[launch.index("accelerate launch") + 1 :]
    launch_args = launch_command_parser().parse_args([w for w in after_launch if "<" not in w])
    assert launch_args.training_script == "scripts/train_gspo.py"
    assert launch_args.training_script_args[:2] == ["--config", f"recipes/{name}"]
    trainers = launch_args.num_processes or GPUS_PER_NODE
    trainer_gpus, serve_gpus = visible_gpus(launch), visible_gpus(serve)
    assert len(trainer_gpus) == trainers and len(serve_gpus) == server_gpus
    if serve_gpus != set(range(GPUS_PER_NODE)) or trainer_gpus != set(range(GPUS_PER_NODE)):  # one node
        assert not trainer_gpus & serve_gpus and len(trainer_gpus | serve_gpus) <= GPUS_PER_NODE
    # every rollout and every optimizer step holds whole groups of completions
    step = trainers * args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert step % args.num_generations == 0
    assert trainers * args.per_device_train_batch_size * args.steps_per_generation % args.num_generations == 0


# --- recipes/README.md -----------------------------------------------------------------------------------------------


def test_readme_lists_every_recipe_and_config():
    text = README.read_text()
    for recipe in training_recipes():
        relative = recipe.relative_to(ROOT).as_posix()
        if recipe.is_relative_to(RECIPES / "tiny"):
            assert relative in text or "recipes/tiny/" in text, f"README does not mention {relative}"
        else:
            assert relative in text, f"README does not list {relative}"
    for config in accelerate_configs():
        assert config.relative_to(ROOT).as_posix() in text, f"README does not mention {config.name}"


def test_readme_commands_point_at_existing_files():
    text = README.read_text()
    for match in re.finditer(r"--config(?:_file)?[ =](\S+)", text):
        path = match.group(1).strip("`'\"")
        if "<" in path or "$" in path or "*" in path:  # placeholders
            continue
        assert (ROOT / path).is_file(), f"README names {path}, which does not exist"


# --- accelerate configs ----------------------------------------------------------------------------------------------


def launch_args(config: Path, *extra: str):
    """accelerate launch's own processing of `--config_file config` (what `accelerate launch` would run with)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(config), "--main_process_port", "0", *extra, "scripts/train_gspo.py"]
    args, defaults, mixed_precision_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args, defaults, mixed_precision_from_config


def test_expected_accelerate_configs_exist():
    names = {p.stem for p in accelerate_configs()}
    assert set(EXPECTED_ACCELERATE_CONFIGS) <= names, f"missing: {set(EXPECTED_ACCELERATE_CONFIGS) - names}"


@pytest.mark.parametrize("config", accelerate_configs(), ids=[p.stem for p in accelerate_configs()])
def test_accelerate_config_loads(config):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cluster = load_config_from_file(str(config))
    assert isinstance(cluster, ClusterConfig)
    assert cluster.num_processes == 8 and cluster.num_machines == 1 and cluster.machine_rank == 0
    assert getattr(cluster.mixed_precision, "value", cluster.mixed_precision) == "bf16" and not cluster.use_cpu
    assert getattr(cluster.compute_environment, "value", None) == "LOCAL_MACHINE"

    # accelerate copies these sections onto launch arguments without checking them: a typo would be ignored.
    known = {action.dest for action in launch_command_parser()._actions}
    for key in cluster.deepspeed_config:
        assert key in known, f"{config.name}: unknown deepspeed_config key {key!r}"
    for key in cluster.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in known, f"{config.name}: unknown key {key!r}"

    args, _, _ = launch_args(config)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    overridden, _, _ = launch_args(config, "--num_processes", "2")
    assert overridden.num_processes == 2


def test_ddp_config():
    args, _, _ = launch_args(ACCELERATE_CONFIGS / "ddp.yaml")
    assert args.multi_gpu and not args.use_deepspeed and not args.use_fsdp


def test_fsdp2_config(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = ACCELERATE_CONFIGS / "fsdp2.yaml"
    raw = yaml.safe_load(config.read_text())["fsdp_config"]
    assert raw["fsdp_version"] == 2
    assert raw["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert raw["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"

    args, _, _ = launch_args(config)
    assert args.use_fsdp and not args.use_deepspeed
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert getattr(plugin.auto_wrap_policy, "__name__", "") == "transformer_auto_wrap_policy"


@pytest.mark.parametrize("name", sorted(DEEPSPEED_EXPECTED))
def test_deepspeed_config_validates(name, monkeypatch, tmp_path):
    """accelerate launch -> DeepSpeedPlugin -> HF Trainer's "auto" resolution -> deepspeed's own DeepSpeedConfig."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    stage, optimizer_device, param_device = DEEPSPEED_EXPECTED[name]
    args, defaults, mixed_precision_from_config = launch_args(ACCELERATE_CONFIGS / f"{name}.yaml")
    assert args.use_deepspeed and args.num_processes == 8
    # what launch_command does before handing over to the DeepSpeed launcher
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)

    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    assert plugin.zero_stage == stage
    assert plugin.zero3_init_flag is (stage == 3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSPOPrecisionWarning)
        training_args = GSPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            num_generations=4,
            bf16=True,
            activation_checkpointing=True,
            use_cpu=True,
            report_to="none",
        )
    hf_config = HfTrainerDeepSpeedConfig(copy.deepcopy(plugin.deepspeed_config))
    hf_config.trainer_config_process(training_args)
    hf_config.trainer_config_finalize(training_args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 10)
    resolved = hf_config.config
    assert "auto" not in repr(resolved), f"unresolved 'auto' values in {resolved}"

    ds = DeepSpeedConfig(resolved)
    assert ds.zero_enabled and ds.zero_optimization_stage == stage
    assert ds.bfloat16_config.enabled
    assert ds.train_micro_batch_size_per_gpu == 4 and ds.gradient_accumulation_steps == 2
    zero = resolved["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == optimizer_device
    assert zero["offload_param"]["device"] == param_device
    assert hf_config.is_zero3() == (stage == 3)
    assert hf_config.is_offload() == (optimizer_device != "none")
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # a plain model.safetensors at save


def test_readme_launch_lines_parse():
    """Every `accelerate launch` line of the README is accepted by accelerate's launch parser."""
    from accelerate.commands.launch import launch_command_parser

    text = README.read_text().replace("\\\n", " ")
    lines = [
        line.strip(" `$") for line in text.splitlines() if "accelerate launch" in line and "--config_file" in line
    ]
    assert lines, "README has no accelerate launch command"
    for line in lines:
        command = line[line.index("accelerate launch") + len("accelerate launch") :].split("`")[0]
        argv = shlex.split(command, comments=True)
        if any("<" in token for token in argv):
            continue
        args = launch_command_parser().parse_args(argv)
        assert args.training_script == "scripts/train_gspo.py", line
        assert "--config" in args.training_script_args, line
