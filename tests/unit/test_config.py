"""GSPOConfig: the paper's defaults, refusals at construction, and warnings."""

import warnings

import pytest
import torch
from trl import GRPOConfig

from trl_gspo import (
    GSPOClipRangeWarning,
    GSPOConfig,
    GSPOOnPolicyWarning,
    GSPOPrecisionWarning,
    GSPOUnusedSettingWarning,
)


def make(tmp_path, **kwargs):
    kwargs.setdefault("per_device_train_batch_size", 8)
    kwargs.setdefault("num_generations", 4)
    return GSPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


def test_paper_defaults(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSPOOnPolicyWarning)  # the defaults themselves must not warn
        warnings.simplefilter("error", GSPOClipRangeWarning)
        config = make(tmp_path)
    assert config.importance_sampling_level == "sequence"
    assert (config.epsilon, config.epsilon_high) == (3e-4, 4e-4)
    assert config.beta == 0.0
    assert config.loss_type == "grpo"
    assert config.steps_per_generation == 4 * config.gradient_accumulation_steps
    assert not config.is_on_policy
    grpo = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=8)
    assert grpo.steps_per_generation == grpo.gradient_accumulation_steps  # TRL's default is on-policy


def test_default_scales_with_gradient_accumulation(tmp_path):
    config = make(tmp_path, gradient_accumulation_steps=2)
    assert config.steps_per_generation == 8
    assert config.generation_batch_size == 8 * 8
    # an explicit generation batch is respected, not overridden
    config = make(tmp_path, generation_batch_size=64)
    assert config.steps_per_generation == 8


@pytest.mark.parametrize("level", ["sequence", "sequence_token", "token"])
def test_accepted_levels(tmp_path, level):
    kwargs = {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28} if level == "token" else {}
    assert make(tmp_path, importance_sampling_level=level, **kwargs).importance_sampling_level == level


@pytest.mark.parametrize(
    "kwargs, field, expected",
    [
        ({"importance_sampling_level": "seq"}, "importance_sampling_level='seq'", "sequence_token"),
        ({"epsilon": 0.0}, "epsilon=0.0", "(0, 1)"),
        ({"epsilon": 1.5}, "epsilon=1.5", "(0, 1)"),
        ({"epsilon_high": 1.0}, "epsilon_high=1.0", "(0, 1)"),
        ({"epsilon_high": -0.1}, "epsilon_high=-0.1", "(0, 1)"),
        ({"loss_type": "dapo"}, "loss_type='dapo'", "weights each sequence by its"),
        ({"loss_type": "bnpo"}, "loss_type='bnpo'", "weights each sequence by its"),
        ({"loss_type": "dr_grpo"}, "loss_type='dr_grpo'", "weights each sequence by its"),
        ({"loss_type": "cispo"}, "loss_type='cispo'", "different objective"),
        ({"loss_type": "luspo"}, "loss_type='luspo'", "different objective"),
        ({"loss_type": "mystery"}, "loss_type='mystery'", "only allowed value is 'grpo'"),
        ({"beta": -0.1}, "beta=-0.1", ">= 0"),
        ({"delta": 2.0}, "delta=2.0", "leave it None"),
        ({"use_adaptive_entropy": True}, "use_adaptive_entropy=True", "fixed entropy_coef"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile=0.2", "sequence_token"),
        ({"log_ratio_bound": 0.0}, "log_ratio_bound=0.0", "> 0"),
        ({"num_iterations": 0}, "num_iterations=0", ">= 1"),
    ],
)
def test_refused_at_construction(tmp_path, kwargs, field, expected):
    with pytest.raises(ValueError) as info:
        make(tmp_path, **kwargs)
    message = str(info.value)
    assert field in message and expected in message


@pytest.mark.parametrize(
    "kwargs, field, expected",
    [
        ({"max_completion_length": 0}, "max_completion_length=0", "positive number of tokens"),
        ({"num_generations": 1}, "num_generations=1", ">= 2"),
        ({"num_generations": 0}, "num_generations=0", ">= 2"),  # TRL: ZeroDivisionError
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0", "positive integer"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0", "positive integer"),
        ({"steps_per_generation": 0}, "steps_per_generation=0", "positive integer"),
        ({"generation_batch_size": 0}, "generation_batch_size=0", "positive integer"),
        ({"temperature": 0.0}, "temperature=0.0", "> 0"),
        ({"temperature": -1.0}, "temperature=-1.0", "> 0"),
        ({"top_p": 0.0}, "top_p=0.0", "(0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5", "(0, 1]"),
        ({"top_k": -1}, "top_k=-1", ">= 0"),
        ({"min_p": 2.0}, "min_p=2.0", "[0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0", "> 0"),
        ({"learning_rate": -1e-5}, "learning_rate=-1e-05", ">= 0"),
        ({"seed": -1}, "seed=-1", "[0, 2**32 - 1]"),
    ],
)
def test_generation_fields_refused_at_construction(tmp_path, kwargs, field, expected):
    """Values that transformers, torch or TRL refuse only once the model has loaded (or divide by), in their own
    names (`max_new_tokens`, `batch_size`) or as a ZeroDivisionError: refused here, naming the field."""
    with pytest.raises(ValueError) as info:
        make(tmp_path, **kwargs)
    message = str(info.value)
    assert f"GSPOConfig.{field} must be" in message and expected in message, message


def test_generation_fields_accept_their_off_values(tmp_path):
    config = make(tmp_path, top_p=1.0, top_k=0, min_p=0.0, learning_rate=0.0, max_completion_length=1)
    assert (config.top_p, config.top_k, config.min_p, config.learning_rate) == (1.0, 0, 0.0, 0.0)
    assert make(tmp_path, use_vllm=True, top_k=-1).top_k == -1  # vLLM's "off"


def test_default_config_raises_no_deprecation_warning(tmp_path):
    """GRPOConfig's default sits on transformers 5's deprecated `gradient_checkpointing`; GSPOConfig keeps the
    default (on) under `activation_checkpointing`, and a value set under either name is honoured."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = make(tmp_path)
        assert config.activation_checkpointing is True and config.gradient_checkpointing is True
        assert make(tmp_path, activation_checkpointing=False).activation_checkpointing is False
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):  # the user's own old name
        assert make(tmp_path, gradient_checkpointing=False).activation_checkpointing is False


def test_token_level_vllm_weights_refused_for_plain_gspo(tmp_path):
    # GRPOConfig itself does not import vLLM at construction, so the combination can be checked here
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode='token_mask'"):
        make(tmp_path, use_vllm=True, vllm_importance_sampling_mode="token_mask")
    config = make(
        tmp_path, importance_sampling_level="sequence_token", use_vllm=True, vllm_importance_sampling_mode="token_mask"
    )
    assert config.use_vllm


def test_features_allowed_where_defined(tmp_path):
    assert make(tmp_path, importance_sampling_level="sequence_token", top_entropy_quantile=0.2).top_entropy_quantile
    assert make(tmp_path, entropy_coef=0.01).entropy_coef == 0.01
    assert make(tmp_path, off_policy_mask_threshold=0.5).off_policy_mask_threshold == 0.5
    assert make(tmp_path, beta=0.04).beta == 0.04
    # token level (plain GRPO) keeps every TRL loss
    assert make(tmp_path, importance_sampling_level="token", loss_type="cispo", epsilon_high=5.0).loss_type == "cispo"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps_per_generation": 1},
        {"gradient_accumulation_steps": 4, "steps_per_generation": 4},
    ],
)
def test_on_policy_warns(tmp_path, kwargs):
    with pytest.warns(GSPOOnPolicyWarning, match="GSPO equals GRPO") as record:
        config = make(tmp_path, **kwargs)
    assert config.is_on_policy
    ours = [w for w in record if issubclass(w.category, GSPOOnPolicyWarning)]
    assert len(ours) == 1 and "steps_per_generation" in str(ours[0].message)


def test_num_iterations_makes_it_off_policy(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSPOOnPolicyWarning)
        config = make(tmp_path, steps_per_generation=1, num_iterations=2)
    assert not config.is_on_policy


def test_on_policy_warning_only_for_sequence_levels(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSPOOnPolicyWarning)
        make(tmp_path, importance_sampling_level="token", steps_per_generation=1)


def test_grpo_like_clip_range_warns(tmp_path):
    with pytest.warns(GSPOClipRangeWarning, match="GRPO"):
        make(tmp_path, epsilon=0.2, epsilon_high=0.28)
    with pytest.warns(GSPOClipRangeWarning):
        make(tmp_path, epsilon=3e-4, epsilon_high=0.05)


def test_token_level_takes_grpo_clip_range(tmp_path):
    """The token level is TRL's GRPO loss: an unset clip range is GRPOConfig's (read from TRL, not restated), and
    it does not warn; the sequence levels keep the paper's band."""
    grpo = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSPOClipRangeWarning)
        token = make(tmp_path, importance_sampling_level="token", loss_type="dapo")
    assert (token.epsilon, token.epsilon_high) == (grpo.epsilon, grpo.epsilon_high)
    for level in ("sequence", "sequence_token"):
        assert (make(tmp_path, importance_sampling_level=level).epsilon_high) == 4e-4
    # each bound left unset keeps its level's default beside a set one
    assert make(tmp_path, epsilon=1e-3).epsilon_high == 4e-4
    assert make(tmp_path, importance_sampling_level="token", epsilon_high=0.28).epsilon == grpo.epsilon


@pytest.mark.parametrize("clip", [{"epsilon": 3e-4, "epsilon_high": 4e-4}, {"epsilon": 1e-3}])
def test_sequence_sized_clip_range_at_token_level_warns(tmp_path, clip):
    with pytest.warns(GSPOClipRangeWarning, match="importance_sampling_level='token'"):
        make(tmp_path, importance_sampling_level="token", **clip)


def test_every_changed_default_is_documented_once(tmp_path):
    """A default GSPO changes is explained once: in its field's help= (naming GRPOConfig's value) when GSPOConfig
    redefines the field, else in the class docstring; the docstring restates no field's help."""
    from dataclasses import fields

    from trl_gspo.config import gspo_defaults_taken

    grpo = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", num_generations=4)
    changed = set(gspo_defaults_taken(grpo, make(tmp_path), {})) | {"beta"}
    assert {"importance_sampling_level", "epsilon", "loss_type", "steps_per_generation"} <= changed
    own = {f.name: f.metadata["help"] for f in fields(GSPOConfig) if f.name in GSPOConfig.__annotations__}
    for name in changed:
        assert "GRPOConfig" in own[name] if name in own else f"`{name}" in GSPOConfig.__doc__, name
    for name in own:
        assert f"{name} (`" not in GSPOConfig.__doc__, f"{name} is documented in the docstring and in its help="


def test_grpo_upgrade_keeps_user_fields(tmp_path):
    from trl_gspo.config import upgrade_grpo_config

    grpo = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=8,
        num_generations=4,
        learning_rate=3e-6,
        max_completion_length=64,
    )
    gspo, _ = upgrade_grpo_config(grpo)
    assert isinstance(gspo, GSPOConfig)
    assert (gspo.learning_rate, gspo.max_completion_length, gspo.num_generations) == (3e-6, 64, 4)
    assert gspo.importance_sampling_level == "sequence" and gspo.epsilon == 3e-4 and gspo.loss_type == "grpo"
    assert gspo.steps_per_generation == 4
    # a choice the user made explicitly that GSPO cannot honour is refused, not silently replaced
    with pytest.raises(ValueError, match="loss_type='bnpo'"):
        upgrade_grpo_config(GRPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="bnpo"))


def test_half_precision_off_policy_warns(tmp_path):
    with pytest.warns(GSPOPrecisionWarning, match="PRECISION.md") as caught:
        make(tmp_path, bf16=True)
    # bf16 is told it misses the band, and pointed to float32 first (fp16 helps but does not get there)
    (message,) = [str(w.message) for w in caught if w.category is GSPOPrecisionWarning]
    assert "bf16 log-probs can get the sequence log-ratio wrong by more than the clip band" in message
    assert "On a GPU pick float32 with TF32 off (bf16=False" in message
    assert "fp16=True (the Trainer scales the loss) is several times more accurate" in message
    assert "still not inside the band, nor is TF32" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSPOPrecisionWarning)
        make(tmp_path, bf16=False)  # float32 log-probs
        with pytest.warns(GSPOOnPolicyWarning):
            make(tmp_path, bf16=True, steps_per_generation=1)  # on-policy: the ratio is exactly 1 anyway
        make(tmp_path, bf16=True, importance_sampling_level="token", loss_type="dapo", epsilon=0.2)


# --- bf16 by hardware, and the GRPOConfig upgrade --------------------------------------------------------------------


def test_bf16_default_follows_the_hardware(tmp_path, monkeypatch):
    """GRPOConfig picks bf16 even on a CPU-only machine (where it then fails without use_cpu); GSPOConfig picks it
    only where the accelerator supports it."""
    import torch

    from trl_gspo import config as config_module

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16"):
            GRPOConfig(output_dir=str(tmp_path), report_to="none")
        config = GSPOConfig(output_dir=str(tmp_path), report_to="none")  # no use_cpu: the README's first try
        assert config.bf16 is False and config.mixed_precision == "no"
    assert make(tmp_path).bf16 is False  # use_cpu: float32
    assert make(tmp_path, bf16=True).bf16 is True  # an explicit choice is kept
    assert make(tmp_path, fp16=False, bf16=False).bf16 is False
    monkeypatch.setattr(config_module, "is_torch_bf16_gpu_available", lambda: True)
    assert config_module.default_bf16(use_cpu=False) is True
    assert config_module.default_bf16(use_cpu=True) is False
    monkeypatch.setattr(config_module, "is_torch_bf16_gpu_available", lambda: False)
    assert config_module.default_bf16(use_cpu=False) is False


def grpo(tmp_path, **kwargs):
    return GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=8, **kwargs
    )


@pytest.mark.parametrize(
    ("grpo_kwargs", "clip_range"),
    [
        ({}, (3e-4, 4e-4)),  # no clip range set: GSPO's pair
        ({"epsilon": 0.25}, (0.25, 0.25)),  # GRPOConfig's epsilon_high=None means epsilon_high=epsilon
        ({"epsilon_high": 0.28}, (0.2, 0.28)),  # GRPOConfig's epsilon default goes with the set upper bound
        ({"epsilon": 1e-3, "epsilon_high": 2e-3}, (1e-3, 2e-3)),
    ],
)
def test_grpo_upgrade_keeps_the_clip_range_as_a_pair(tmp_path, grpo_kwargs, clip_range):
    from trl_gspo.config import upgrade_grpo_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSPOClipRangeWarning)  # 0.2-sized ranges warn, as they should
        config, notice = upgrade_grpo_config(grpo(tmp_path, num_generations=4, **grpo_kwargs))
    assert (config.epsilon, config.epsilon_high) == clip_range
    kept, defaults = notice.split("Kept, as you set them: ")[1].split(". Took GSPO's defaults: ")
    defaults = defaults.split(". A field equal")[0]
    for name in ("epsilon", "epsilon_high"):
        assert (f"{name}=" in kept) == bool(grpo_kwargs), notice
        assert (f"{name}=" in defaults) == (not grpo_kwargs), notice
    assert f"epsilon_high={clip_range[1]!r}" in (kept if grpo_kwargs else defaults)


def test_grpo_upgrade_notice_names_exactly_what_was_kept(tmp_path):
    from trl_gspo.config import upgrade_grpo_config

    args = grpo(tmp_path, num_generations=4, learning_rate=3e-6, loss_type="grpo", bf16=False)
    config, notice = upgrade_grpo_config(args)
    assert config.output_dir == args.output_dir  # carried although equal to the reference's
    kept, defaults = notice.split("Kept, as you set them: ")[1].split(". Took GSPO's defaults: ")
    defaults = defaults.split(". A field equal")[0]
    # bf16=False differs from GRPOConfig's default (True): kept; loss_type='grpo' too (GRPOConfig: 'dapo');
    # per_device_train_batch_size=8 and report_to='none' are GRPOConfig's defaults: not listed as set
    assert {item.split("=")[0] for item in kept.split(", ")} == {
        "bf16",
        "learning_rate",
        "loss_type",
        "num_generations",
    }
    assert {item.split("=")[0] for item in defaults.split(", ")} == {
        "disable_dropout",
        "epsilon",
        "epsilon_high",
        "importance_sampling_level",
        "steps_per_generation",
    }
    assert config.disable_dropout is True  # GRPOConfig's False counts as not set
    assert "importance_sampling_level='sequence'" in defaults and "steps_per_generation=4" in defaults


def test_grpo_upgrade_notice_names_every_gspo_default_that_differs(tmp_path, monkeypatch):
    """The defaults named are derived from the configs: a GSPO default that starts to differ from GRPOConfig's (here
    temperature, set in __post_init__) is named without any list to update; generation_batch_size follows from
    steps_per_generation and is not."""
    from trl_gspo.config import upgrade_grpo_config

    post_init = GSPOConfig.__post_init__

    def cooler(self):
        if self.temperature == 1.0:
            self.temperature = 0.7
        post_init(self)

    monkeypatch.setattr(GSPOConfig, "__post_init__", cooler)
    config, notice = upgrade_grpo_config(grpo(tmp_path, num_generations=4, bf16=False))
    defaults = notice.split(". Took GSPO's defaults: ")[1].split(". A field equal")[0]
    assert config.temperature == 0.7 and "temperature=0.7" in defaults
    assert "generation_batch_size" not in defaults and "steps_per_generation=4" in defaults


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(token_advantage_weight=0.5), r"token_advantage_weight=0.5 is only used with .*'sequence_token'"),
        (
            dict(token_advantage_weight=0.5, importance_sampling_level="token", epsilon=0.2),
            r"token_advantage_weight=0.5 .* not 'token'",
        ),
        (dict(padding_free_row_tokens=64), r"padding_free_row_tokens=64 needs padding_free=True"),
        (
            dict(rollout_logprobs_check_interval=1),
            r"rollout_logprobs_check_interval=1 needs use_rollout_logprobs=True",
        ),
    ],
)
def test_settings_without_effect_warn(tmp_path, fields, message):
    with pytest.warns(GSPOUnusedSettingWarning, match=message):
        make(tmp_path, **fields)


def test_settings_with_effect_do_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSPOUnusedSettingWarning)
        make(tmp_path)
        make(tmp_path, token_advantage_weight=0.5, importance_sampling_level="sequence_token")
        make(tmp_path, padding_free=True, padding_free_row_tokens=64)
        make(tmp_path, use_rollout_logprobs=True, rollout_logprobs_check_interval=1)


def test_fp16_warning_depends_on_the_device(tmp_path, monkeypatch):
    # on the CPU accelerate runs fp16=True in float32 (tests/trainer/test_mixed_precision.py): say so, not "rounding"
    with pytest.warns(GSPOPrecisionWarning, match="computes in float32 and fp16 has no effect") as caught:
        make(tmp_path, fp16=True, bf16=False)
    assert not any("rounding" in str(w.message) for w in caught if w.category is GSPOPrecisionWarning)
    with pytest.warns(GSPOPrecisionWarning, match="fp16 has no effect"), pytest.warns(GSPOOnPolicyWarning):
        make(tmp_path, fp16=True, bf16=False, steps_per_generation=1)  # whatever the schedule
    # on an accelerator fp16 really rounds: the milder warning, still pointing to float32
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    with pytest.warns(GSPOPrecisionWarning, match="several times more accurate than bf16") as caught:
        GSPOConfig(
            output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=8, num_generations=4, fp16=True
        )
    (message,) = [str(w.message) for w in caught if w.category is GSPOPrecisionWarning]
    assert "rounding still decides some clips" in message and "fp16=False" in message
    assert "float32 with TF32 off" in message and "fp16 is the faster second choice, ahead of bf16" in message
    assert "has no effect" not in message
