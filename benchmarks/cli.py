"""A/B benchmark: trl_gspo.GSPOTrainer against TRL's GRPOTrainer with its own sequence-level ratio.

Both trainers run the identical configuration: the same tiny model (same architecture, same seed, so the same
initial weights), the same prompts, reward, seeds, clip range (GSPO's 3e-4 / 4e-4), beta=0, loss_type="grpo",
importance_sampling_level="sequence", steps_per_generation=4 (off-policy: pi_old log-probs are computed by both),
gradient_accumulation_steps=1. TRL's side is `GRPOConfig(importance_sampling_level="sequence", loss_type="grpo")`,
which is the same GSPO objective written inline in `GRPOTrainer._compute_loss`.

What is measured (BENCHMARKS.md has the method and the figures)
----------------
- lockstep A/B, the step-time figure: both trainers in one process, two threads taking turns one optimizer step
  at a time (A B A B, who starts alternates between runs); a TrainerCallback times on_step_begin -> on_step_end
  (generation when due, pi_old log-probs, forward, loss, backward, optimizer step), wall and process CPU time.
  The first generation cycle (steps_per_generation steps) is warm-up. Reported: the median of the per-step ratios
  GSPO_k / TRL_k with its IQR, for all steps, steps that generate and steps that only train.
- separate trials: each trial a fresh subprocess with one trainer, in the order GSPO, TRL, TRL, GSPO, ...; its
  `ru_maxrss` is that trial's own peak RSS (CPU), on CUDA `torch.cuda.max_memory_allocated` (reset before
  training). Also the step times, whole-run time per step, `_compute_loss` time and completion tokens/s, as the
  ratio of the medians over trials with the min-max of the per-pair ratios (noisy on a shared machine).
- in-process A/B: `_compute_loss` + backward on one synthetic micro-batch with the real model, and the "loss tail"
  (the same with the policy forward stubbed: exactly the code GSPOTrainer replaces), alternating every round.
- the objective alone: `compute_policy_objective("sequence", ...)` against the same math written the TRL way
  (`trl_way_sequence_objective`, the lines of GRPOTrainer._compute_loss's sequence path, clip metrics included),
  on synthetic (B, T) tensors, forward + backward, per call.
- `--aa-control` makes both sides GRPOTrainer: what "equal" looks like with these methods.
- `--workload ragged-moe` (gspo_benchmarks.ragged_moe): a tiny MoE model generating with transformers, its EOS
  logit biased so completion lengths are ragged; in lockstep both trainers sample step k's rollout with the same
  random numbers. Generation is inside the timed steps on both sides (with R3 and rollout log-probs, so is their
  recording in generate()).

A ratio is GSPO / TRL: below 1 means GSPOTrainer is cheaper.

Examples
--------
    python scripts/benchmark.py                       # default tiny CPU run (~70 s on 2 busy cores)
    python scripts/benchmark.py --quick --json out.json
    python scripts/benchmark.py --scaling             # completion lengths 64/256/1024 x group sizes 4/8/16
    python scripts/benchmark.py --workload ragged-moe --padding-free --rollout-logprobs --rollout-routing-replay
                                                      # tiny MoE, generated ragged completions, GSPO's composed passes
    python scripts/benchmark.py --device cuda --shape qwen2.5-0.5b --bf16   # GPU path, UNTESTED (no GPU here)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from gspo_benchmarks.ragged_moe import DEFAULT_MAX_COMPLETION_LENGTH, MEAN_COMPLETION_AT_INIT, MOE_MODEL_TYPES
from gspo_benchmarks.trainer_ab import (
    NOT_AVAILABLE,
    SHAPES,
    STEPS_PER_GENERATION,
    TRAINERS,
    bench_objective,
    bench_trainers,
    fmt_paired,
    fmt_ratio,
    goals_for,
    markdown_config_table,
    markdown_scaling_table,
    pool_lockstep,
    profile_objectives,
    run_trial_subprocess,
    summarize_trials,
)
from trl_gspo.config import PAPER_EPSILON_HIGH, PAPER_EPSILON_LOW

# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _int_list(text):
    return [int(x) for x in text.replace(",", " ").split()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model-type",
        default=None,
        help="tiny model architecture (gspo_examples.tiny.ARCHITECTURES); default qwen2, qwen3_moe for --workload "
        "ragged-moe (which needs an MoE one)",
    )
    p.add_argument(
        "--shape",
        default="tiny",
        choices=["tiny", *SHAPES],
        help="'tiny': gspo_examples.tiny model of --hidden-size/--num-layers; a named shape is a random model of that\n"
        "shape (--num-layers, if given, overrides its layer count)",
    )
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=None, help="default 2 for --shape tiny")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument(
        "--completion-lengths",
        type=_int_list,
        default=None,
        help="max_completion_length values, e.g. '64,256' (default 128; 256 for --workload ragged-moe)",
    )
    p.add_argument("--num-generations", type=_int_list, default=None, help="group sizes G, e.g. '4,8' (default 8)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per_device_train_batch_size (completions per optimizer step); default: one group (= G)",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per trial; the first 4 are warm-up")
    p.add_argument("--trials", type=int, default=None, help="trials per trainer (alternating order)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision for both (default fp32: faster on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the cuda path has not been run by its authors)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per trial (default 1 on cpu: see BENCHMARKS.md)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workload",
        choices=("equal", "ragged", "ragged-moe"),
        default="equal",
        help="equal: 'ab+cd=' prompts, generated completions of one length; ragged: synthetic rollouts of log-normal "
        "prompt and completion lengths (benchmarks/ragged.py), identical on both sides; ragged-moe: a tiny MoE model\n"
        "generating with transformers, its EOS logit biased so completion lengths are geometric "
        "(benchmarks/ragged_moe.py)",
    )
    p.add_argument("--padding-free", action="store_true", help="GSPOConfig(padding_free=True) on the GSPO side")
    p.add_argument(
        "--row-tokens", type=int, default=None, help="GSPOConfig.padding_free_row_tokens (default: the padded width)"
    )
    p.add_argument(
        "--rollout-logprobs",
        action="store_true",
        help="GSPOConfig(use_rollout_logprobs=True) on the GSPO side (no pi_old forward)",
    )
    p.add_argument(
        "--rollout-routing-replay",
        action="store_true",
        help="GSPOConfig(rollout_routing_replay=True) on the GSPO side (R3: replays generate()'s experts; MoE only)",
    )
    p.add_argument(
        "--baseline",
        choices=("trl", "gspo-padding-free"),
        default="trl",
        help="the other side: TRL's GRPOTrainer (default), or GSPOTrainer(padding_free=True) to measure what "
        "--rollout-logprobs adds on top of padding-free passes (the tables still call that side 'TRL')",
    )
    p.add_argument("--allow-eos", action="store_true", help="let completions end early (lengths then vary)")
    p.add_argument("--objective-rounds", type=int, default=15, help="alternating rounds of the objective bench")
    p.add_argument("--ab-rounds", type=int, default=None, help="alternating rounds of the in-process A/B")
    p.add_argument("--skip-trainer", action="store_true", help="only the objective micro-benchmark")
    p.add_argument(
        "--profile-objective",
        action="store_true",
        help="print torch.profiler tables of the objectives for each (length, G) and exit",
    )
    p.add_argument(
        "--skip-in-process",
        action="store_true",
        help="leave out the in-process A/B (always left out for --workload ragged-moe: its synthetic micro-batch has\n"
        "no rollout routing or rollout log-probs)",
    )
    p.add_argument(
        "--lockstep-runs",
        type=int,
        default=2,
        help="lockstep A/B runs (both trainers in one process taking turns step by step); 0 leaves them out",
    )
    p.add_argument(
        "--aa-control",
        action="store_true",
        help="A/A check of the method: the 'gspo' side is also a GRPOTrainer, so every ratio should be ~1",
    )
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 trial, 6 steps, tiny shapes")
    p.add_argument("--scaling", action="store_true", help="lengths 64,256,1024 x G 4,8,16, small model")
    args = p.parse_args(argv)

    if args.scaling:
        defaults = dict(
            completion_lengths=[64, 256, 1024], num_generations=[4, 8, 16], steps=12, trials=1, ab_rounds=6
        )
    elif args.quick:
        defaults = dict(completion_lengths=[16], num_generations=[4], steps=6, trials=1, ab_rounds=2)
        args.hidden_size, args.objective_rounds = min(args.hidden_size, 32), 3
        if args.num_layers is None and args.shape == "tiny":
            args.num_layers = 1
    else:
        defaults = dict(completion_lengths=[128], num_generations=[8], steps=20, trials=3, ab_rounds=10)
    if args.workload == "ragged-moe":
        if not (args.quick or args.scaling):
            defaults["completion_lengths"] = [DEFAULT_MAX_COMPLETION_LENGTH]
        args.skip_in_process = True
        args.model_type = args.model_type or "qwen3_moe"
        if args.shape != "tiny" or args.model_type not in MOE_MODEL_TYPES:
            p.error(
                f"--workload ragged-moe needs --shape tiny and an MoE --model-type ({', '.join(MOE_MODEL_TYPES)}); "
                f"got --shape {args.shape} --model-type {args.model_type}"
            )
    elif args.rollout_routing_replay:
        p.error("--rollout-routing-replay needs --workload ragged-moe (an MoE model generating with transformers)")
    args.model_type = args.model_type or "qwen2"
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_layers is None and args.shape == "tiny":
        args.num_layers = 2
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.steps <= STEPS_PER_GENERATION:
        p.error(f"--steps must exceed the {STEPS_PER_GENERATION} warm-up steps")
    return args


def base_spec(args, completion_length, num_generations):
    spec = dict(
        shape=args.shape,
        model_type=args.model_type,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        completion_length=completion_length,
        num_generations=num_generations,
        batch_size=args.batch_size or num_generations,
        steps=args.steps,
        bf16=args.bf16,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        suppress_eos=not args.allow_eos,
        ab_rounds=args.ab_rounds,
        aa_control=args.aa_control,
        workload=args.workload,
        padding_free=args.padding_free,
        rollout_logprobs=args.rollout_logprobs,
        rollout_routing_replay=args.rollout_routing_replay,
        baseline=args.baseline,
        row_tokens=args.row_tokens,
    )
    if args.shape != "tiny":
        shape = SHAPES[args.shape]
        spec.update(
            model_type=shape["model_type"],
            hidden_size=shape["hidden_size"],
            num_layers=args.num_layers or shape["num_layers"],
            num_heads=shape["num_heads"],
        )
    return spec


def machine_description(args):
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "device": args.device,
    }
    try:
        import transformers
        import trl

        info.update(transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        print("NOTE: the CUDA path of this benchmark has not been run on a GPU by its authors.", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.profile_objective:
        for length in args.completion_lengths:
            for group in args.num_generations:
                profile_objectives(args.batch_size or group, length, args.device, dtype)
        return 0
    report = {
        "command": " ".join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_description(args),
        "settings": {
            "epsilon": PAPER_EPSILON_LOW,
            "epsilon_high": PAPER_EPSILON_HIGH,
            "beta": 0.0,
            "loss_type": "grpo",
            "importance_sampling_level": "sequence",
            "steps_per_generation": STEPS_PER_GENERATION,
            "gradient_accumulation_steps": 1,
            "warmup_steps": STEPS_PER_GENERATION,
            "precision": "bf16" if args.bf16 else "fp32",
            "shape": args.shape,
            "model_type": args.model_type,
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "steps": args.steps,
            "trials": args.trials,
            "threads": args.threads,
            "eos_suppressed": not args.allow_eos and args.workload == "equal",
            "aa_control": args.aa_control,
            "workload": args.workload,
            "padding_free": args.padding_free,
            "use_rollout_logprobs": args.rollout_logprobs,
            "rollout_routing_replay": args.rollout_routing_replay,
            "baseline": args.baseline,
            "padding_free_row_tokens": args.row_tokens,
        },
        "not_available": NOT_AVAILABLE,
        "configs": [],
    }
    if args.workload == "ragged-moe":
        report["settings"]["mean_completion_length_at_init"] = MEAN_COMPLETION_AT_INIT
    started = time.perf_counter()
    for length in args.completion_lengths:
        for group in args.num_generations:
            spec = base_spec(args, length, group)
            print(f"== completion length {length}, G={group}, batch {spec['batch_size']}", flush=True)
            config_result = {
                "completion_length": length,
                "num_generations": group,
                "batch_size": spec["batch_size"],
                "workload": args.workload,
                "padding_free": args.padding_free,
            }
            config_result["objective"] = bench_objective(
                spec["batch_size"], length, args.device, dtype, rounds=args.objective_rounds, seed=args.seed
            )
            print(f"    objective alone, GSPO/TRL {fmt_ratio(config_result['objective'])}", flush=True)
            if not args.skip_trainer and not args.skip_in_process:
                ab = run_trial_subprocess({**spec, "mode": "in_process"})
                config_result["in_process"] = ab
                print(
                    f"    in-process A/B, GSPO/TRL: _compute_loss+backward {fmt_ratio(ab['micro_step'])}, "
                    f"loss tail {fmt_ratio(ab['loss_tail'])}",
                    flush=True,
                )
            if not args.skip_trainer and args.lockstep_runs:
                runs = [
                    run_trial_subprocess({**spec, "mode": "lockstep", "first": TRAINERS[i % 2]})
                    for i in range(args.lockstep_runs)
                ]
                config_result["lockstep"] = pool_lockstep(runs)
                ls = config_result["lockstep"]
                print(
                    f"    lockstep A/B, GSPO/TRL per step: all {fmt_paired(ls['wall_all'])}, "
                    f"with generation {fmt_paired(ls['wall_gen'])}, without {fmt_paired(ls['wall_train'])}; "
                    f"mean completion length {ls['completion_mean_length']['gspo']:.1f} / "
                    f"{ls['completion_mean_length']['trl']:.1f}, padded share of log-prob slots "
                    f"{100 * ls['padded_share']['gspo']:.1f} % / {100 * ls['padded_share']['trl']:.1f} %",
                    flush=True,
                )
            if not args.skip_trainer:
                trials = bench_trainers(spec, args.trials, log=lambda m: print(m, flush=True))
                config_result["trials"] = trials
                config_result["trainer_summary"] = summarize_trials(trials)
            config_result["goals"] = goals_for(config_result)
            report["configs"].append(config_result)
    report["elapsed_s"] = time.perf_counter() - started

    print()
    print(
        f"# GSPOTrainer vs GRPOTrainer(importance_sampling_level='sequence'), {report['settings']['precision']}, "
        f"{args.device}, {args.trials} trial(s) x {args.steps} steps, {report['elapsed_s']:.0f} s"
    )
    print()
    if len(report["configs"]) > 1:
        print(markdown_scaling_table(report["configs"]))
        for label, text in NOT_AVAILABLE.items():
            print(f"\n{label}: {text}")
    else:
        print(markdown_config_table(report["configs"][0]))
    print()
    for config in report["configs"]:
        verdicts = ", ".join(
            f"{name} {goal['value']:.3f} (<= {goal['goal']}: {'met' if goal['met'] else 'MISSED'})"
            for name, goal in config["goals"].items()
        )
        print(f"- length {config['completion_length']}, G {config['num_generations']}: {verdicts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0
