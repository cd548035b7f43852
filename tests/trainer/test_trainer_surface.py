"""What a GRPO user sees of GSPOTrainer besides the loss: the same metric names as GRPOTrainer, a start banner,
and a rollout buffer that is loaded without unpickling code."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL_RUN, completion_length_reward, prompt_dataset, small_config
from trl import GRPOConfig, GRPOTrainer

from gspo_examples.tiny import save_tiny_model
from trl_gspo import GSPOTrainer
from trl_gspo.banner import distributed_backend, optimizer_steps_per_rollout, start_banner
from trl_gspo.config import GSPOPrecisionWarning
from trl_gspo.rollout_buffer import UnsafeCheckpointError, load_rollout_buffer

# --- metric names: everything GRPOTrainer logs for the same configuration ---------------------------------------------

SHARED = dict(SMALL_RUN, max_steps=2, steps_per_generation=2, loss_type="grpo", importance_sampling_level="sequence")


def logged_keys(trainer_cls, args, model_path) -> set[str]:
    trainer = trainer_cls(
        model=model_path,  # a folder, so that beta > 0 can load the reference model from it
        reward_funcs=completion_length_reward,
        args=args,
        train_dataset=prompt_dataset(),
    )
    trainer.train()
    return {key for entry in trainer.state.log_history for key in entry if not key.startswith("train_")}


@pytest.mark.parametrize("extra", [{"entropy_coef": 0.01}, {"entropy_coef": 0.01, "beta": 0.04}], ids=["bonus", "kl"])
def test_logs_every_metric_grpo_trainer_logs(tmp_path, extra):
    """Dashboards built for GRPO keep working: GRPOTrainer's metric names are a subset of GSPOTrainer's, for the
    same configuration (with an entropy bonus GRPOTrainer adds policy_loss and entropy_coef)."""
    from trl_gspo import GSPOConfig

    model_path = save_tiny_model(tmp_path / "model", hidden_size=32)
    grpo = logged_keys(GRPOTrainer, GRPOConfig(output_dir=str(tmp_path / "grpo"), **SHARED, **extra), model_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gspo_args = GSPOConfig(output_dir=str(tmp_path / "gspo"), **SHARED, **extra)
    gspo = logged_keys(GSPOTrainer, gspo_args, model_path)
    assert {"policy_loss", "entropy_coef"} <= grpo  # what the comparison is about: present on the GRPO side
    assert grpo - gspo == set(), f"GRPOTrainer logs {sorted(grpo - gspo)}, GSPOTrainer does not"
    assert "gspo/clipped_token_fraction" in gspo
    if extra.get("beta"):
        assert "kl" in grpo


# --- start banner ----------------------------------------------------------------------------------------------------


def test_banner_names_world_backend_precision_and_gspo_settings(tmp_path):
    args = small_config(tmp_path, gradient_accumulation_steps=2)  # steps_per_generation 8: 4 steps per rollout
    line = start_banner(2, "DDP", "no", args, "cuda")
    assert line.startswith("GSPO run: world size 2, backend DDP, mixed precision none (float32) |")
    assert "importance_sampling_level='sequence'" in line and "clip range [1-0.0003, 1+0.0004]" in line
    assert "4 optimizer steps per rollout (off-policy)" in line
    assert optimizer_steps_per_rollout(args) == 4
    # the launch config's bf16 over a recipe's bf16: false is named as such
    overridden = start_banner(8, "DeepSpeed ZeRO-3", "bf16", args, "cuda")
    assert "mixed precision bf16 (from the launch config" in overridden and "bf16=False" in overridden
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_policy = small_config(tmp_path, steps_per_generation=1, bf16=True)
    line = start_banner(1, "single process", "bf16", on_policy, "cpu")
    assert "mixed precision bf16 |" in line and "1 optimizer steps per rollout (on-policy" in line
    assert line.endswith("(on-policy: the ratio is 1)")  # no switch on, none named
    switched = small_config(tmp_path, padding_free=True, importance_sampling_level="sequence_token")
    assert start_banner(1, "single process", "no", switched, "cpu").endswith(
        "| padding_free, token_advantage_weight=1"
    )


def test_banner_names_every_gspo_switch_that_is_on(tmp_path):
    """Every boolean GSPOConfig adds to GRPOConfig with default False is named when on, so a new one is too."""
    import copy
    from dataclasses import fields

    from trl_gspo import GSPOConfig

    grpo_fields = {f.name for f in fields(GRPOConfig)}
    # f.type is "bool" until an argument parser resolves the annotations in place, then bool
    switches = [
        f.name for f in fields(GSPOConfig) if f.name not in grpo_fields and f.type in ("bool", bool) and not f.default
    ]
    assert {"padding_free", "use_rollout_logprobs", "routing_replay", "rollout_routing_replay"} <= set(switches)
    args = small_config(tmp_path)
    assert not start_banner(1, "single process", "no", args, "cpu").endswith(tuple(switches))
    for name in switches:
        switched = copy.copy(args)
        setattr(switched, name, True)  # one at a time: some switches refuse each other at construction
        line = start_banner(1, "single process", "no", switched, "cpu")
        assert line.endswith(f"| {name}"), line


def test_distributed_backend_names():
    def accelerator(processes=1, deepspeed=None, fsdp=None):
        state = SimpleNamespace(deepspeed_plugin=deepspeed, fsdp_plugin=fsdp)
        return SimpleNamespace(state=state, num_processes=processes)

    assert distributed_backend(accelerator()) == "single process"
    assert distributed_backend(accelerator(2)) == "DDP"
    assert distributed_backend(accelerator(2, deepspeed=SimpleNamespace(zero_stage=3))) == "DeepSpeed ZeRO-3"
    assert distributed_backend(accelerator(2, fsdp=SimpleNamespace(fsdp_version=2))) == "FSDP2"


def test_trainer_prints_the_banner_once(make_model, tokenizer, tmp_path, capsys):
    GSPOTrainer(
        model=make_model(),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    out = capsys.readouterr().out
    assert out.count("GSPO run: world size 1, backend single process, mixed precision none (float32)") == 1


def test_banner_names_fp16_on_the_cpu_as_float32(make_model, tokenizer, tmp_path, capsys):
    """fp16=True on the CPU computes in float32 (accelerate records fp16 but runs no fp16 autocast there): the banner
    says what the run computes in, not the setting."""
    with pytest.warns(GSPOPrecisionWarning):
        args = small_config(tmp_path, fp16=True)
    trainer = GSPOTrainer(
        model=make_model(),
        reward_funcs=completion_length_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    assert trainer.accelerator.mixed_precision == "fp16" and not trainer.accelerator.native_amp
    banner = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("GSPO run: "))
    assert "mixed precision none (float32: fp16 has no effect on the CPU" in banner
    assert "mixed precision fp16" not in banner
    # on an accelerator fp16 is what runs, named as such
    assert "mixed precision fp16 |" in start_banner(1, "single process", "fp16", args, "cuda")


# --- rollout buffer: weights_only loading ----------------------------------------------------------------------------


class Exploit:
    """Unpickling this creates a file: what a malicious checkpoint would do with a shell command instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_rollout_buffer_of_plain_fields_loads(tmp_path):
    buffer = [
        {
            "prompt_ids": torch.arange(6).view(2, 3),
            "advantages": torch.tensor([0.5, -0.5]),
            "old_per_token_logps": None,
            "num_items_in_batch": torch.tensor(12),
            "images": None,
            "meta": {"count": 2, "ratio": 0.5, "names": ["a", "b"]},
        }
    ]
    path = tmp_path / "buffer.pt"
    torch.save(buffer, path)
    loaded = load_rollout_buffer(path)
    assert torch.equal(loaded[0]["prompt_ids"], buffer[0]["prompt_ids"])
    assert loaded[0]["old_per_token_logps"] is None and loaded[0]["meta"] == buffer[0]["meta"]


def test_rollout_buffer_with_a_pickled_callable_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "gspo_rollout_buffer_rank0.pt"
    torch.save([{"advantages": torch.zeros(2), "payload": Exploit(marker)}], path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="gspo_rollout_buffer_rank0.pt"):
        load_rollout_buffer(path)
    assert not marker.exists(), "unpickling ran code"
    torch.load(path, weights_only=False)  # the old way: the control shows the payload is live
    assert marker.exists()
