"""The trainer A/B benchmark behind `scripts/benchmark.py`: GSPOTrainer against TRL's GRPOTrainer on identical work.

What is measured and how is in gspo_benchmarks.cli's docstring and BENCHMARKS.md and BENCHMARKS.md. This module holds the machinery: the
objective-alone comparison, one training trial (run in its own interpreter, `python -m
gspo_benchmarks.trainer_ab SPEC_JSON OUT_JSON`, so its peak RSS is its own), the lockstep and in-process A/B
runs, the summaries, markdown tables and goals. A ratio is GSPO / TRL: below 1 means GSPOTrainer is cheaper.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch

from trl_gspo.config import PAPER_EPSILON_HIGH, PAPER_EPSILON_LOW  # used by both trainers

STEPS_PER_GENERATION = 4
TRAINERS = ("gspo", "trl")

# Shapes for --shape. "tiny" takes --hidden-size / --num-layers; the others are fixed and random-initialised.
SHAPES = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}

# Rows in the tables that this package cannot measure yet. Kept visible so nobody fills them in by hand.
NOT_AVAILABLE = {}


# --------------------------------------------------------------------------------------------------------------
# The objective alone
# --------------------------------------------------------------------------------------------------------------


def trl_way_sequence_objective(per_token_logps, old_per_token_logps, advantages, mask, epsilon_low, epsilon_high):
    """GSPO loss and clip statistics computed as GRPOTrainer._compute_loss does for importance_sampling_level=
    "sequence", loss_type="grpo", beta=0, no vLLM, no entropy or off-policy mask (trl 1.16).

    The lines are TRL's, with `self.` removed and the cross-process reductions (accelerator.reduce / gather +
    .item()) replaced by the local tensors they would reduce, so that no host sync is timed.

    Returns:
        (loss, stats): loss before the gradient-accumulation division; stats the local tensors behind TRL's
        clip_ratio/{low,high,region}_mean (sum, count) and clip_ratio/{low_min,high_max} (per sequence).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()

    # Metrics, as in TRL (global_masked_mean / masked_seq_mean on (B, 1) tensors), without the reductions.
    with torch.no_grad():
        is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        is_region_clipped = is_low_clipped | is_high_clipped
        count = torch.tensor(float(coef_1.shape[0]), device=coef_1.device)
        stats = {
            "low_mean": torch.stack([is_low_clipped.float().sum(), count]),
            "high_mean": torch.stack([is_high_clipped.float().sum(), count]),
            "region_mean": torch.stack([is_region_clipped.float().sum(), count]),
            "low_per_seq": is_low_clipped.float().squeeze(1),
            "high_per_seq": is_high_clipped.float().squeeze(1),
        }
    return loss, stats


def gspo_sequence_objective(per_token_logps, old_per_token_logps, advantages, mask, epsilon_low, epsilon_high):
    """`compute_policy_objective("sequence", ...)` as GSPOTrainer calls it with beta=0 and no weights."""
    from trl_gspo.objective import compute_policy_objective

    out = compute_policy_objective(
        "sequence", per_token_logps, old_per_token_logps, advantages, mask, epsilon_low, epsilon_high
    )
    return out.loss, out


OBJECTIVES = {
    "gspo": gspo_sequence_objective,
    "trl": trl_way_sequence_objective,
}


def make_objective_inputs(batch, length, device="cpu", dtype=torch.float32, seed=0, empty_rows=True):
    """Synthetic GSPO inputs: log-probs near an old policy, ragged right-padded masks, signed advantages."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen) * 4.0
    logps = old + 0.01 * torch.randn(batch, length, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    if empty_rows and batch > 2:
        lengths[0] = 0  # an all-masked row
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()
    advantages = torch.randn(batch, generator=gen)
    logps = logps.to(device=device, dtype=dtype).requires_grad_(True)
    return logps, old.to(device=device, dtype=dtype), advantages.to(device), mask.to(device)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def alternate_timing(calls, rounds, min_time, device, warmup=3, max_number=1 << 14):
    """Seconds per call of each function in `calls`, alternating the order every round (A B, B A, ...).

    Each round runs every function `number` times back to back; `number` is chosen so that one batch of calls
    of the first function takes at least `min_time`. Returns ({name: [seconds per call, one per round]}, number).
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    number = 1
    while True:
        _sync(device)
        start = time.perf_counter()
        for _ in range(number):
            calls[names[0]]()
        _sync(device)
        if time.perf_counter() - start >= min_time or number >= max_number:
            break
        number *= 2
    per_call = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(number):
                calls[name]()
            _sync(device)
            per_call[name].append((time.perf_counter() - start) / number)
    return per_call, number


def _ratio_entry(a, b):
    """Ratio of the medians of a and b, and the min-max of the per-round ratios a_i / b_i."""
    pair = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(a) / statistics.median(b), "pair_min": min(pair), "pair_max": max(pair)}


def bench_objective(batch, length, device="cpu", dtype=torch.float32, rounds=15, min_time=0.02, seed=0):
    """Forward + backward per call of the two objectives (GSPO, TRL way), alternating the order each round.
    Times in microseconds; "ratio" is GSPO / TRL."""
    logps, old, advantages, mask = make_objective_inputs(batch, length, device, dtype, seed)

    def call(name):
        loss, _ = OBJECTIVES[name](logps, old, advantages, mask, PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH)
        (grad,) = torch.autograd.grad(loss, logps)
        return grad

    per_call, number = alternate_timing(
        {name: (lambda name=name: call(name)) for name in OBJECTIVES}, rounds, min_time, device
    )
    per_call = {name: [t * 1e6 for t in times] for name, times in per_call.items()}
    result = {"batch": batch, "length": length, "dtype": str(dtype).replace("torch.", ""), "calls_per_round": number}
    for name in OBJECTIVES:
        result[f"{name}_us"] = _spread(per_call[name])
    result["ratio"] = _ratio_entry(per_call["gspo"], per_call["trl"])
    return result


def profile_objectives(batch, length, device="cpu", dtype=torch.float32, calls=50, row_limit=12):
    """torch.profiler op tables (self CPU time, forward + backward) of the objectives, and single-op timings on
    (batch, length) of the two ways to mask a log-ratio: torch.where (`masked_token_diff`, NaN-safe) and the
    product with the mask (`sequence_log_ratio`). Returns the text it prints."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.benchmark import Timer

    logps, old, advantages, mask = make_objective_inputs(batch, length, device, dtype)
    lines = [f"## Objective profiles, ({batch}, {length}) {str(dtype).replace('torch.', '')}, {calls} calls each"]
    for name, func in OBJECTIVES.items():
        for _ in range(5):
            torch.autograd.grad(func(logps, old, advantages, mask, PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH)[0], logps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                torch.autograd.grad(
                    func(logps, old, advantages, mask, PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH)[0], logps
                )
        lines += [f"### {name}", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)]
    diff = (logps - old).detach()
    mask_bool = mask.bool()
    lines.append("### single ops on (B, T)")
    for stmt in ("torch.where(mask_bool, diff, torch.zeros_like(diff))", "diff * mask"):
        timer = Timer(stmt, globals={"torch": torch, "diff": diff, "mask": mask, "mask_bool": mask_bool})
        lines.append(f"{stmt:55s} {timer.blocked_autorange(min_run_time=0.3).median * 1e6:9.1f} us")
    text = "\n".join(lines)
    print(text)
    return text


# --------------------------------------------------------------------------------------------------------------
# One training trial (runs in its own subprocess)
# --------------------------------------------------------------------------------------------------------------


def digit_fraction_reward(completions, **kwargs):
    """Fraction of digits in the completion: cheap, deterministic, and varies within a group of a random model."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def _current_rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


PROMPT_LENGTH = 6  # "ab+cd=" in the char tokenizer
RAGGED_PROMPT_MAX = 192  # gspo_benchmarks.ragged.PROMPT_LENGTHS["high"]


def build_model(spec, tokenizer):
    """The model of a trial: gspo_examples.tiny's builder for --shape tiny, a random config of the named shape otherwise.

    Both trainers get a model built from the same spec and seed, hence the same initial weights.
    """
    from gspo_examples.tiny import build_tiny_causal_lm

    prompt_length = RAGGED_PROMPT_MAX if spec.get("workload") == "ragged" else PROMPT_LENGTH
    max_positions = max(512, spec["completion_length"] + prompt_length + 8)
    if spec.get("shape", "tiny") == "tiny":
        model = build_tiny_causal_lm(
            tokenizer,
            model_type=spec["model_type"],
            hidden_size=spec["hidden_size"],
            num_layers=spec["num_layers"],
            num_heads=spec["num_heads"],
            max_position_embeddings=max_positions,
            seed=spec["seed"],
        )
        if spec.get("workload") == "ragged-moe":  # EOS-biased: ragged lengths from generation (ragged_moe.py)
            from gspo_benchmarks.ragged_moe import MEAN_COMPLETION_AT_INIT, add_eos_logit_bias, eos_logit_bias

            bias = eos_logit_bias(len(tokenizer), MEAN_COMPLETION_AT_INIT)
            add_eos_logit_bias(model, tokenizer.eos_token_id, bias)
        return model
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = SHAPES[spec["shape"]]
    config = AutoConfig.for_model(
        shape["model_type"],
        vocab_size=shape["vocab_size"],  # larger than the char tokenizer: the LM head costs what the real one does
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=max(max_positions, 32768),
        tie_word_embeddings=shape["tie_word_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if spec["bf16"] else torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def _setup_worker(spec):
    import datasets

    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])


def make_trainer(spec, name, output_dir):
    """GSPOTrainer ("gspo") or GRPOTrainer ("trl") on the configuration `spec`, identical but for the class."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from gspo_examples.tiny import build_char_tokenizer
    from trl_gspo import GSPOConfig, GSPOTrainer

    tokenizer = build_char_tokenizer()
    model = build_model(spec, tokenizer)
    # Prompts "ab+cd=" of the same length; enough distinct ones for every generation batch of the run.
    num_prompts = max(64, spec["steps"] * spec["batch_size"])
    prompts = [f"{i % 97:02d}+{(7 * i) % 89:02d}=" for i in range(num_prompts)]
    dataset = datasets.Dataset.from_dict({"prompt": prompts})

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        steps_per_generation=STEPS_PER_GENERATION,
        num_generations=spec["num_generations"],
        max_completion_length=spec["completion_length"],
        max_steps=spec["steps"],
        learning_rate=1e-3,  # large enough for the tiny model's ratios to leave the clip band: clipping is exercised
        beta=0.0,
        epsilon=PAPER_EPSILON_LOW,
        epsilon_high=PAPER_EPSILON_HIGH,
        loss_type="grpo",
        importance_sampling_level="sequence",
        temperature=1.0,
        use_cpu=spec["device"] == "cpu",
        bf16=spec["bf16"],
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=spec["seed"],
        data_seed=spec["seed"],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if spec["suppress_eos"] and spec.get("workload", "equal") == "equal":  # no EOS: completions run to max length
        common["generation_kwargs"] = {"suppress_tokens": [tokenizer.eos_token_id]}
    extra = {}
    if spec.get("workload") == "ragged":  # identical synthetic rollouts on both sides (gspo_benchmarks.ragged)
        from gspo_benchmarks.ragged import ragged_rollout_func

        os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
        extra["rollout_func"] = ragged_rollout_func(tokenizer, spec["completion_length"], seed=spec["seed"])
    if name == "gspo" and not spec.get("aa_control"):
        gspo_fields = dict(
            padding_free=spec.get("padding_free", False),
            padding_free_row_tokens=spec.get("row_tokens"),
            use_rollout_logprobs=spec.get("rollout_logprobs", False),
            rollout_routing_replay=spec.get("rollout_routing_replay", False),
        )
        args, trainer_cls = GSPOConfig(**common, **gspo_fields), GSPOTrainer
    elif spec.get("baseline") == "gspo-padding-free":  # the "trl" side is GSPOTrainer with padding_free only
        args, trainer_cls = GSPOConfig(**common, padding_free=True), GSPOTrainer
    else:
        args, trainer_cls = GRPOConfig(**common), GRPOTrainer
    return trainer_cls(
        model=model,
        reward_funcs=digit_fraction_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        **extra,
    )


def log_prob_pass_attribute(trainer) -> str:
    """The trainer attribute every log-prob pass goes through: GSPOTrainer's forward backend (TRL's method only sees
    the rollout's deferred passes there), GRPOTrainer's `_get_per_token_logps_and_entropies`."""
    return "forward" if hasattr(trainer, "forward") else "_get_per_token_logps_and_entropies"


def record_pass_masks(trainer):
    """Keep the attention mask of every log-prob pass, chunk by chunk as it is run (for the padded-token share).

    Only a reference to the mask is kept on the timed path; the share is computed after training.
    """
    masks = []
    name = log_prob_pass_attribute(trainer)
    inner = getattr(trainer, name)

    def recording(model, input_ids, attention_mask, logits_to_keep, batch_size=None, *args, **kwargs):
        masks.append((attention_mask, batch_size or attention_mask.size(0)))
        return inner(model, input_ids, attention_mask, logits_to_keep, batch_size, *args, **kwargs)

    setattr(trainer, name, recording)
    return masks


def pass_padding_share(trainer, masks):
    """Padded share of the slots the log-prob passes processed (see gspo_benchmarks.ragged.padding_share)."""
    from gspo_benchmarks.ragged import padding_share

    chunks = [mask[i : i + size].cpu() for mask, size in masks for i in range(0, mask.size(0), size)]
    packed = bool(getattr(trainer.args, "padding_free", False))
    return padding_share(chunks, packed, getattr(trainer.args, "padding_free_row_tokens", None))


def run_trial(spec):
    """Build model, data and trainer from `spec`, train `spec["steps"]` steps, return the measurements."""
    from transformers import TrainerCallback

    _setup_worker(spec)
    device = spec["device"]
    trainer = make_trainer(spec, spec["trainer"], spec["output_dir"])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    trainer.add_callback(timer)
    loss_times = []
    inner_compute_loss = trainer._compute_loss

    def timed_compute_loss(model, inputs):
        _sync(device)
        start = time.perf_counter()
        loss = inner_compute_loss(model, inputs)
        _sync(device)
        loss_times.append(time.perf_counter() - start)
        return loss

    trainer._compute_loss = timed_compute_loss
    pass_masks = record_pass_masks(trainer)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = _current_rss_kib()
    _sync(device)
    start = time.perf_counter()
    trainer.train()
    _sync(device)
    wall = time.perf_counter() - start

    warmup = STEPS_PER_GENERATION
    gen_steps = [t for i, t in enumerate(timer.times) if i >= warmup and i % STEPS_PER_GENERATION == 0]
    train_steps = [t for i, t in enumerate(timer.times) if i >= warmup and i % STEPS_PER_GENERATION != 0]
    measured = timer.times[warmup:]
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    mean_lengths = [h["completions/mean_length"] for h in logs]
    clip_region = [h.get("clip_ratio/region_mean") for h in trainer.state.log_history if "clip_ratio/region_mean" in h]
    mean_length = statistics.mean(mean_lengths) if mean_lengths else float("nan")
    result = {
        "trainer": spec["trainer"],
        "steps": len(timer.times),
        "step_s_all": statistics.median(measured) if measured else float("nan"),
        "step_s_gen": statistics.median(gen_steps) if gen_steps else float("nan"),
        "step_s_train": statistics.median(train_steps) if train_steps else float("nan"),
        "mean_step_s": statistics.mean(measured) if measured else float("nan"),
        "compute_loss_s": statistics.median(loss_times[warmup:]) if len(loss_times) > warmup else float("nan"),
        "run_s_per_step": wall / max(len(timer.times), 1),
        "completion_mean_length": mean_length,
        "clip_region_mean": statistics.mean(clip_region) if clip_region else float("nan"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_train_mib": rss_before / 1024,
        "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None,
    }
    result["train_peak_rss_delta_mib"] = result["peak_rss_mib"] - result["rss_before_train_mib"]
    result.update(pass_padding_share(trainer, pass_masks))
    # completion tokens trained per second of measured step time
    result["tokens_per_s"] = spec["batch_size"] * mean_length / result["mean_step_s"]
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def synthetic_micro_batch(tokenizer, spec, device, seed=0):
    """One micro-batch as GRPOTrainer hands it to _compute_loss: prompts, ragged completions, advantages."""
    batch, length = spec["batch_size"], spec["completion_length"]
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.tensor(tokenizer("12+34=")["input_ids"])
    completion_ids = torch.randint(3, len(tokenizer), (batch, length), generator=gen)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=gen)
    lengths[0] = length
    completion_mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    inputs = {
        "prompt_ids": prompt.repeat(batch, 1),
        "prompt_mask": torch.ones(batch, prompt.numel(), dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(batch, generator=gen),
    }
    return {key: value.to(device) for key, value in inputs.items()}


def run_in_process_ab(spec):
    """Both trainers in one process, timed call by call on the same micro-batch, alternating every round.

    - micro_step: `_compute_loss` + backward with the real model (the optimizer step and generation, identical
      code in both trainers, left out);
    - loss_tail: the same with the policy forward replaced by precomputed log-probs, i.e. exactly the code that
      GSPOTrainer replaces (objective + metrics + the glue around them) and its backward.
    Noise from other jobs on the machine hits both sides within seconds of each other.
    """
    _setup_worker(spec)
    device = spec["device"]
    trainers = {}
    with tempfile.TemporaryDirectory(prefix="gspo-bench-") as tmp:
        for name in TRAINERS:
            trainer = make_trainer(spec, name, os.path.join(tmp, name))
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; outside it we set it
            trainers[name] = trainer
    tokenizer = trainers["trl"].processing_class
    inputs = synthetic_micro_batch(tokenizer, spec, device, spec["seed"])
    reference = trainers["trl"]
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        logps, entropies, _ = reference._get_per_token_logps_and_entropies(
            reference.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            spec["completion_length"],
            compute_entropy=True,
        )
    noise = 0.01 * torch.randn(logps.shape, generator=gen).to(device)
    inputs["old_per_token_logps"] = (logps.float() + noise).to(logps.dtype)

    def micro_step(name):
        trainer = trainers[name]
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)
        return loss.detach()

    losses = {name: micro_step(name).item() for name in TRAINERS}
    per_call, number = alternate_timing(
        {name: (lambda name=name: micro_step(name)) for name in TRAINERS}, spec["ab_rounds"], 0.1, device, warmup=2
    )
    result = {"micro_step": {"calls_per_round": number, "loss": losses}}
    for name in TRAINERS:
        result["micro_step"][f"{name}_ms"] = _spread([t * 1e3 for t in per_call[name]])
    result["micro_step"]["ratio"] = _ratio_entry(per_call["gspo"], per_call["trl"])

    # loss tail: the policy forward replaced by fixed log-probs (a leaf that takes the gradient)
    leaf = logps.detach().float().clone().requires_grad_(True)
    for trainer in trainers.values():
        setattr(trainer, log_prob_pass_attribute(trainer), lambda *a, **k: (leaf * 1.0, entropies, None))

    def tail(name):
        trainer = trainers[name]
        loss = trainer._compute_loss(trainer.model, inputs)
        return torch.autograd.grad(loss, leaf)[0]

    grads = {name: tail(name) for name in TRAINERS}
    per_call, number = alternate_timing(
        {name: (lambda name=name: tail(name)) for name in TRAINERS}, spec["ab_rounds"] * 2, 0.05, device
    )
    result["loss_tail"] = {
        "calls_per_round": number,
        "max_abs_grad_diff": (grads["gspo"] - grads["trl"]).abs().max().item(),
    }
    for name in TRAINERS:
        result["loss_tail"][f"{name}_us"] = _spread([t * 1e6 for t in per_call[name]])
    result["loss_tail"]["ratio"] = _ratio_entry(per_call["gspo"], per_call["trl"])
    return result


class _Baton:
    """Lets two training threads take turns one optimizer step at a time, in the order of `schedule`.

    A trainer holds the baton from its on_step_begin to its next on_step_begin, so its logging and data loading
    after a step never overlap the other trainer's step. A finished trainer's turns are skipped.
    """

    def __init__(self, schedule):
        self.schedule, self.index = schedule, 0
        self.cond = threading.Condition()
        self.holding, self.finished = set(), set()

    def _skip_finished(self):
        while self.index < len(self.schedule) and self.schedule[self.index] in self.finished:
            self.index += 1

    def acquire(self, name):
        with self.cond:
            if name in self.holding:  # hand over the turn taken at the previous step
                self.holding.discard(name)
                self.index += 1
                self._skip_finished()
                self.cond.notify_all()
            self.cond.wait_for(lambda: self.index >= len(self.schedule) or self.schedule[self.index] == name)
            self.holding.add(name)

    def finish(self, name):
        with self.cond:
            self.finished.add(name)
            if name in self.holding:
                self.holding.discard(name)
                self.index += 1
            self._skip_finished()
            self.cond.notify_all()


def run_lockstep(spec):
    """Both trainers train in one process, in two threads that take turns step by step (A B A B ...).

    Step k of GSPOTrainer and step k of GRPOTrainer run within a second of each other, so load from other jobs
    on a shared machine hits both alike; the per-step ratios GSPO_k / TRL_k are then tight even when the absolute
    times wander. Both trainers use the same step indices for generation (every steps_per_generation steps).
    """
    from transformers import TrainerCallback

    _setup_worker(spec)
    device = spec["device"]
    # Strict alternation A B A B: every step follows a step of the other trainer, so both always start on caches
    # the other one left (an A B B A order would hand one side a warm cache on the odd steps, the other on the
    # even ones, and generation steps are all even). Who goes first alternates between lockstep runs.
    first = spec.get("first", TRAINERS[0])
    order = (first, *[name for name in TRAINERS if name != first])
    schedule = list(order) * spec["steps"]
    baton = _Baton(schedule)
    times = {name: [] for name in TRAINERS}
    cpu_times = {name: [] for name in TRAINERS}
    errors = []
    # Both trainers sample from the process's one torch generator. On a workload whose completion lengths come from
    # sampling, step k of each starts from the same generator state, so the two sides' k-th rollouts are drawn with
    # the same random numbers (identical while the weights are, close after).
    reseed = spec.get("workload") == "ragged-moe"
    # The baton orders steps; before its first step each trainer also builds its data iterator (which may draw from
    # the torch generator): both finish that before either starts step 0, so it overlaps no step of the other.
    set_up = threading.Barrier(len(TRAINERS))

    class TakeTurns(TrainerCallback):
        def __init__(self, name):
            self.name, self.start, self.cpu_start = name, None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                set_up.wait()
            baton.acquire(self.name)
            if reseed:
                torch.manual_seed(spec["seed"] * 1_000_003 + state.global_step)
            _sync(device)
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            times[self.name].append(time.perf_counter() - self.start)
            cpu_times[self.name].append(time.process_time() - self.cpu_start)

        def on_train_end(self, args, state, control, **kwargs):
            baton.finish(self.name)

    with tempfile.TemporaryDirectory(prefix="gspo-bench-") as tmp:
        trainers = {name: make_trainer(spec, name, os.path.join(tmp, name)) for name in TRAINERS}
        pass_masks = {}
        for name, trainer in trainers.items():
            trainer.add_callback(TakeTurns(name))
            pass_masks[name] = record_pass_masks(trainer)

        def train(name):
            try:
                trainers[name].train()
            except BaseException as exc:  # surface it in the main thread
                errors.append((name, exc))
                set_up.abort()
                baton.finish(name)

        threads = [threading.Thread(target=train, args=(name,), name=f"train-{name}") for name in TRAINERS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        name, exc = errors[0]
        raise RuntimeError(f"lockstep training of {name} failed") from exc

    return {
        "first": first,
        "step_s": times,
        "step_cpu_s": cpu_times,
        "completion_mean_length": {name: _mean_completion_length(trainers[name]) for name in TRAINERS},
        "padded_share": {name: pass_padding_share(trainers[name], pass_masks[name]) for name in TRAINERS},
    }


def _mean_completion_length(trainer):
    """Mean of the logged completions/mean_length over the run's rollouts (NaN if none was logged)."""
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return statistics.mean(lengths) if lengths else float("nan")


STEP_KINDS = (
    ("all", lambda i: True),
    ("gen", lambda i: i % STEPS_PER_GENERATION == 0),
    ("train", lambda i: i % STEPS_PER_GENERATION != 0),
)


def pool_lockstep(runs):
    """Per clock (wall, cpu = process CPU time) and step kind (all, gen, train): the per-step pairs of every
    lockstep run after the warm-up, pooled, and each run's own median ratio."""
    pooled = {"runs": len(runs), "first": [run["first"] for run in runs]}
    if all("completion_mean_length" in run for run in runs):  # per side, the mean over runs
        pooled["completion_mean_length"] = {
            name: statistics.mean(run["completion_mean_length"][name] for run in runs) for name in TRAINERS
        }
        pooled["padded_share"] = {
            name: 1
            - sum(run["padded_share"][name]["real_tokens"] for run in runs)
            / max(sum(run["padded_share"][name]["processed_tokens"] for run in runs), 1)
            for name in TRAINERS
        }
    for clock, key in (("wall", "step_s"), ("cpu", "step_cpu_s")):
        for label, keep in STEP_KINDS:
            gspo, trl, run_medians = [], [], []
            for run in runs:
                n = min(len(run[key]["gspo"]), len(run[key]["trl"]))
                indices = [i for i in range(STEPS_PER_GENERATION, n) if keep(i)]
                if not indices:
                    continue
                g, t = [run[key]["gspo"][i] for i in indices], [run[key]["trl"][i] for i in indices]
                run_medians.append(statistics.median(a / b for a, b in zip(g, t)))
                gspo += g
                trl += t
            if gspo:
                pooled[f"{clock}_{label}"] = _paired_summary(gspo, trl)
                pooled[f"{clock}_{label}"]["ratio"]["run_medians"] = run_medians
    return pooled


def _paired_summary(gspo, trl):
    """Per-step pairs (seconds): each side's spread in ms and the distribution of the ratios GSPO_k / TRL_k."""
    pair = sorted(g / t for g, t in zip(gspo, trl))
    return {
        "gspo_ms": _spread([t * 1e3 for t in gspo]),
        "trl_ms": _spread([t * 1e3 for t in trl]),
        "sum_s": {"gspo": sum(gspo), "trl": sum(trl)},
        "ratio": {
            "median": statistics.median(pair),  # median of the per-step ratios
            "pair_min": pair[0],
            "pair_max": pair[-1],
            "pair_q1": pair[len(pair) // 4],
            "pair_q3": pair[(3 * len(pair)) // 4],
            "ratio_of_medians": statistics.median(gspo) / statistics.median(trl),
            "ratio_of_sums": sum(gspo) / sum(trl),
            "n": len(pair),
        },
    }


def run_trial_subprocess(spec, timeout=1800):
    """Run one trial in a fresh interpreter so that its peak RSS is its own."""
    with tempfile.TemporaryDirectory(prefix="gspo-bench-") as tmp:
        spec = {**spec, "output_dir": os.path.join(tmp, "out")}
        out_path = os.path.join(tmp, "result.json")
        env = {
            **os.environ,
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
        cmd = [sys.executable, "-m", "gspo_benchmarks.trainer_ab", json.dumps(spec), out_path]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(
                f"benchmark trial failed ({spec.get('trainer', spec.get('mode'))}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        with open(out_path) as f:
            return json.load(f)


# --------------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------------


def _spread(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


TRIAL_METRICS = (
    "step_s_all",
    "step_s_gen",
    "step_s_train",
    "compute_loss_s",
    "run_s_per_step",
    "peak_rss_mib",
    "train_peak_rss_delta_mib",
    "tokens_per_s",
    "peak_gpu_mib",
    "padded_share",
)


def summarize_trials(trials):
    """Per metric: each side's median/min/max over trials, the ratio of medians, and the per-pair ratio range."""
    by = {name: [t for t in trials if t["trainer"] == name] for name in TRAINERS}
    summary = {}
    for metric in TRIAL_METRICS:
        if not all(metric in t for t in trials):
            continue
        values = {name: [t[metric] for t in by[name]] for name in TRAINERS}
        entry = {name: _spread(values[name]) for name in TRAINERS}
        pairs = [g / t for g, t in zip(values["gspo"], values["trl"]) if t and math.isfinite(g / t)]
        med = entry["trl"]["median"]
        entry["ratio"] = {
            "median": entry["gspo"]["median"] / med if med else float("nan"),
            "pair_min": min(pairs) if pairs else float("nan"),
            "pair_max": max(pairs) if pairs else float("nan"),
        }
        summary[metric] = entry
    summary["completion_mean_length"] = {
        name: _spread([t["completion_mean_length"] for t in by[name]]) for name in TRAINERS
    }
    return summary


def alternating_order(trials):
    """GSPO, TRL, TRL, GSPO, GSPO, TRL, ...: each pair of trials swaps who goes first."""
    order = []
    for i in range(trials):
        order.extend(TRAINERS if i % 2 == 0 else TRAINERS[::-1])
    return order


def bench_trainers(base_spec, trials, log=print):
    results = []
    for i, name in enumerate(alternating_order(trials)):
        result = run_trial_subprocess({**base_spec, "trainer": name})
        log(
            f"    trial {i // 2 + 1}/{trials} {name:4s}: step {result['step_s_all'] * 1e3:8.1f} ms "
            f"(gen {result['step_s_gen'] * 1e3:.1f}, train {result['step_s_train'] * 1e3:.1f}), "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB, mean length {result['completion_mean_length']:.1f}"
        )
        results.append(result)
    return results


def fmt_ratio(entry):
    r = entry["ratio"]
    return f"{r['median']:.3f} ({r['pair_min']:.3f}-{r['pair_max']:.3f})"


def _fmt_side(entry, scale, unit, digits=1):
    s = entry
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}) {unit}"


def fmt_paired(entry):
    r = entry["ratio"]
    return f"{r['median']:.3f} (IQR {r['pair_q1']:.3f}-{r['pair_q3']:.3f}, n={r['n']})"


def _lockstep_rows(config_result):
    ls = config_result.get("lockstep")
    if not ls:
        return []
    rows = []
    for clock, clock_label in (("wall", "wall"), ("cpu", "process CPU time")):
        for label, text in (
            ("all", "all measured steps"),
            ("gen", "with generation"),
            ("train", "without generation"),
        ):
            entry = ls.get(f"{clock}_{label}")
            if entry:
                rows.append(
                    f"| lockstep A/B optimizer step, {text}, {clock_label} | {_fmt_side(entry['gspo_ms'], 1, 'ms')} "
                    f"| {_fmt_side(entry['trl_ms'], 1, 'ms')} | {fmt_paired(entry)} |"
                )
    if "sum_s" in ls.get("wall_all", {}):  # generation steps weigh in by their time, not as one step of several
        total = ls["wall_all"]["sum_s"]
        rows.append(
            f"| lockstep A/B: total wall time of the measured steps | {total['gspo']:.1f} s | {total['trl']:.1f} s "
            f"| {ls['wall_all']['ratio']['ratio_of_sums']:.3f} (ratio of the sums) |"
        )
    if "completion_mean_length" in ls:
        length, share = ls["completion_mean_length"], ls["padded_share"]
        rows += [
            f"| lockstep A/B: mean completion length | {length['gspo']:.1f} | {length['trl']:.1f} "
            f"| {length['gspo'] / length['trl']:.3f} |",
            f"| lockstep A/B: share of padded slots in the log-prob passes | {100 * share['gspo']:.1f} % "
            f"| {100 * share['trl']:.1f} % | |",
        ]
    return rows


def _ab_rows(config_result):
    ab = config_result.get("in_process")
    if not ab:
        return []
    step, tail = ab["micro_step"], ab["loss_tail"]
    return [
        f"| in-process A/B: _compute_loss + backward, real model, ({config_result['batch_size']}, "
        f"{config_result['completion_length']}) | {_fmt_side(step['gspo_ms'], 1, 'ms', 2)} "
        f"| {_fmt_side(step['trl_ms'], 1, 'ms', 2)} | {fmt_ratio(step)} |",
        f"| in-process A/B: loss tail (objective + metrics + backward, policy forward stubbed) "
        f"| {_fmt_side(tail['gspo_us'], 1, 'us')} | {_fmt_side(tail['trl_us'], 1, 'us')} | {fmt_ratio(tail)} |",
    ]


def markdown_config_table(config_result):
    """One configuration: every metric for both trainers and their ratio."""
    s = config_result.get("trainer_summary", {})
    rows = [
        ("separate trials: optimizer step, all measured steps", "step_s_all", 1e3, "ms"),
        ("separate trials: optimizer step with generation", "step_s_gen", 1e3, "ms"),
        ("separate trials: optimizer step without generation", "step_s_train", 1e3, "ms"),
        ("separate trials: _compute_loss (forward + objective + metrics)", "compute_loss_s", 1e3, "ms"),
        ("separate trials: whole run / steps (warm-up included)", "run_s_per_step", 1e3, "ms"),
        ("peak RSS of the trial process", "peak_rss_mib", 1, "MiB"),
        ("peak RSS growth during train()", "train_peak_rss_delta_mib", 1, "MiB"),
        ("completion tokens / s", "tokens_per_s", 1, "tok/s"),
        ("peak GPU memory allocated", "peak_gpu_mib", 1, "MiB"),
        ("share of padded slots in the log-prob passes", "padded_share", 100, "%"),
    ]
    lines = [
        "| metric | GSPOTrainer median (min-max) | GRPOTrainer seq. median (min-max) | ratio GSPO/TRL |",
        "|---|---|---|---|",
    ]
    lines.extend(_lockstep_rows(config_result))
    for label, key, scale, unit in rows:
        if key in s:
            lines.append(
                f"| {label} | {_fmt_side(s[key]['gspo'], scale, unit)} | {_fmt_side(s[key]['trl'], scale, unit)} "
                f"| {fmt_ratio(s[key])} |"
            )
    lines.extend(_ab_rows(config_result))
    obj = config_result.get("objective")
    if obj:
        lines.append(
            f"| objective alone fwd+bwd, ({obj['batch']}, {obj['length']}) {obj['dtype']} | "
            f"{_fmt_side(obj['gspo_us'], 1, 'us')} | {_fmt_side(obj['trl_us'], 1, 'us')} | {fmt_ratio(obj)} |"
        )
    for label, text in NOT_AVAILABLE.items():
        lines.append(f"| {label} | {text} | {text} | n/a |")
    return "\n".join(lines)


def markdown_scaling_table(results):
    """One row per (completion length, G): the GSPO/TRL ratios."""
    lines = [
        "| completion length | G = batch | mean length GSPO / TRL | objective fwd+bwd (pair min-max) "
        "| loss tail, in-process (pair min-max) | _compute_loss+bwd, in-process | lockstep step, all (IQR) "
        "| lockstep, no gen. | lockstep, with gen. | peak RSS (trials) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.get("trainer_summary")
        ab = r.get("in_process")
        ls = r.get("lockstep")
        cells = [str(r["completion_length"]), str(r["num_generations"])]
        if s:
            length = s["completion_mean_length"]
            cells.append(f"{length['gspo']['median']:.0f} / {length['trl']['median']:.0f}")
        else:
            cells.append("-")
        cells.append(fmt_ratio(r["objective"]))
        if ab:
            cells += [fmt_ratio(ab["loss_tail"]), f"{ab['micro_step']['ratio']['median']:.3f}"]
        else:
            cells += ["-", "-"]
        if ls:
            all_ = ls["wall_all"]["ratio"]
            cells.append(f"{all_['median']:.3f} ({all_['pair_q1']:.3f}-{all_['pair_q3']:.3f})")
            cells += [
                f"{ls[f'wall_{k}']['ratio']['median']:.3f}" if f"wall_{k}" in ls else "-" for k in ("train", "gen")
            ]
        else:
            cells += ["-"] * 3
        cells.append(f"{s['peak_rss_mib']['ratio']['median']:.3f}" if s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


GOALS = {
    "step_time_ratio": 1.02,  # lockstep A/B, median of the per-step ratios, all measured steps
    "step_time_ratio_trials": 1.02,  # separate subprocess trials, ratio of the medians (noisy on a shared machine)
    "in_process_step_ratio": 1.02,  # _compute_loss + backward, in-process A/B
    "peak_memory_ratio": 1.02,
    "objective_ratio": 1.10,
}
# on the ragged workload with padding_free, GSPOTrainer must be clearly faster and use no more memory
RAGGED_PADDING_FREE_GOALS = {"step_time_ratio": 0.8, "step_time_ratio_trials": 0.8, "peak_memory_ratio": 1.0}


def goals_for(config_result):
    """Each goal's measured ratio (median), its bound and whether it is met; goals not measured are left out."""
    values = {"objective_ratio": config_result["objective"]["ratio"]["median"]}
    s = config_result.get("trainer_summary")
    if s:
        memory_key = "peak_gpu_mib" if "peak_gpu_mib" in s else "peak_rss_mib"
        values["step_time_ratio_trials"] = s["step_s_all"]["ratio"]["median"]
        values["peak_memory_ratio"] = s[memory_key]["ratio"]["median"]
    if config_result.get("lockstep"):
        values["step_time_ratio"] = config_result["lockstep"]["wall_all"]["ratio"]["median"]
    if config_result.get("in_process"):
        values["in_process_step_ratio"] = config_result["in_process"]["micro_step"]["ratio"]["median"]
    goals = GOALS
    if config_result.get("workload") == "ragged" and config_result.get("padding_free"):
        goals = {**GOALS, **RAGGED_PADDING_FREE_GOALS}
    return {k: {"value": v, "goal": goals[k], "met": bool(v <= goals[k])} for k, v in values.items()}


def run_worker(spec: dict, out_path: str) -> None:
    """One subprocess trial: run the mode `spec` names and write its result as JSON."""
    workers = {"in_process": run_in_process_ab, "lockstep": run_lockstep}
    result = workers.get(spec.get("mode"), run_trial)(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]), sys.argv[2])
