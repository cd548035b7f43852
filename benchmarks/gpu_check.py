"""The one-shot GPU check (benchmarks/gpu_check.sh): every GPU figure the docs lack, in one file, in about 8 minutes.

    python -m gspo_benchmarks.gpu_check --out runs/gpu_check/gpu_check.json          # CUDA (an NVIDIA GPU)
    python -m gspo_benchmarks.gpu_check --cpu --out /tmp/gpu_check.json              # tiny shapes, end to end

Sections, in order of priority (each one's failure is recorded and the next one runs; past `--budget-s` the rest
are recorded as skipped):

1. environment: versions, GPU, and that every requirement of trl and datasets is met by what is installed (a
   wheel from .whl/ that does not fit the installed packages is named here, before anything runs).
2. precision: gspo_benchmarks.precision's measurement of log s_i against float64 for the six routes (on CUDA:
   real bf16, fp16 and TF32 kernels, fp32 with TF32 off) and its summary table; the cost per forward of each route
   on a Qwen2.5-0.5B-shaped model (the tiny one in CPU mode).
3. first_step: GSPOTrainer at learning rate 0 (4 micro-batches per rollout, 2 per optimizer step), padded and
   padding_free, in every precision the GPU runs: every sequence ratio must be exactly 1 and
   `gspo/first_step_outside_clip_band` 0.
4. trainer_ab: GSPOTrainer against TRL's GRPOTrainer, step time and peak memory (gspo_benchmarks.trainer_ab trials,
   one subprocess each) on the ragged workload of BENCHMARKS.md, Qwen2.5-0.5B shape in bf16, padded and
   padding_free (sdpa).
5. moe: a tiny Qwen3-MoE in bf16 with the routing-drift metric, then with routing replay (R2).

The result is one JSON file; its "report" key is the same in markdown, also printed at the end.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings

import torch

from gspo_benchmarks.trainer_ab import SHAPES

# what the sections "precision" and "trainer_ab" run on a GPU, and their tiny counterparts for --cpu
DEVICE_PLAN = dict(
    precision=dict(lengths=(16, 64, 256, 1024), batch_size=16, hidden_size=128),
    cost=dict(shape=SHAPES["qwen2.5-0.5b"], batch_size=16, length=1024),
    ab=dict(shape="qwen2.5-0.5b", num_layers=None, completion_length=512, steps=12),
)
TINY_SHAPE = dict(
    model_type="qwen2",
    hidden_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=256,
    vocab_size=1024,
    tie_word_embeddings=True,
)
CPU_PLAN = dict(
    precision=dict(lengths=(16, 64), batch_size=4, hidden_size=32),
    cost=dict(shape=TINY_SHAPE, batch_size=1, length=16),
    ab=dict(shape="tiny", num_layers=2, completion_length=32, steps=5),
)
# The MoE settings run in section 5: the drift metric alone, replay of pi_old's experts (R2), replay of the experts
# transformers generation chose (R3)
MOE_SETTINGS = {"drift": {}, "R2": {"routing_replay": True}, "R3": {"rollout_routing_replay": True}}
FIRST_STEP = "gspo/first_step_outside_clip_band"


# --- 1. environment ---------------------------------------------------------------------------------------------------


def unmet_requirements(distributions=("trl", "datasets", "trl-gspo")) -> list[str]:
    """Each requirement (no extras) of `distributions` that the installed packages do not meet, as a sentence."""
    from packaging.requirements import Requirement

    problems = []
    for dist in distributions:
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist} is not installed")
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                installed = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{dist} needs {requirement}: not installed")
                continue
            if installed not in requirement.specifier:
                problems.append(f"{dist} needs {requirement}: {installed} is installed")
    return problems


def environment(device: str) -> dict:
    versions = {}
    for name in ("torch", "transformers", "accelerate", "trl", "datasets", "pyarrow", "peft", "trl-gspo"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}
    info["unmet_requirements"] = unmet_requirements()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        # the defaults the precision routes run under (fp32 and the half routes set TF32 explicitly)
        info["allow_fp16_reduced_precision_reduction"] = (
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        )
        info["allow_bf16_reduced_precision_reduction"] = (
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        )
    return info


# --- 2. precision -----------------------------------------------------------------------------------------------------


def precision(device: str, plan: dict) -> dict:
    from gspo_benchmarks import precision as mp

    settings = mp.Settings(**plan["precision"], device=device, timing_repeats=2 if device == "cuda" else 1)
    result = mp.measure(settings, log=lambda message: print(message, file=sys.stderr, flush=True))
    result["forward_cost"] = {
        "plan": plan["cost"],
        "ms": mp.forward_cost_ms(**plan["cost"], routes=settings.routes, device=device),
    }
    result["summary"] = mp.summary_table(result)
    return result


# --- 3. first optimizer step at learning rate 0 -----------------------------------------------------------------------


def length_reward(completions, **kwargs):
    """Spread inside each group, so advantages are not all zero."""
    return [float(len(c) % 4) for c in completions]


def train_tiny(device: str, model_type: str, **overrides):
    """Train a tiny random model 4 steps (one rollout of 4 optimizer steps) on 64 prompts; the trainer and its logs."""
    from datasets import Dataset

    from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm
    from trl_gspo import GSPOConfig, GSPOTrainer

    tokenizer = build_char_tokenizer()
    dataset = Dataset.from_dict({"prompt": [f"{i}+{i % 7}=" for i in range(64)]})
    with tempfile.TemporaryDirectory(prefix="gspo-gpu-check-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings = dict(
            output_dir=tmp,
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=16,
            steps_per_generation=4,
            max_steps=4,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=device == "cpu",
            disable_tqdm=True,
            seed=0,
        )
        args = GSPOConfig(**{**settings, **overrides})
        trainer = GSPOTrainer(
            model=build_tiny_causal_lm(tokenizer, model_type=model_type, hidden_size=64),
            reward_funcs=length_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


def first_step(device: str) -> dict:
    """Every ratio exactly 1 at learning rate 0, padded and packed, per precision (fp16 only where it runs fp16)."""
    precisions = ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16")
    runs = []
    for precision_name in precisions:
        for padding_free in (False, True):
            trainer, logs = train_tiny(
                device,
                "qwen2",
                learning_rate=0.0,
                gradient_accumulation_steps=2,
                bf16=precision_name == "bf16",
                fp16=precision_name == "fp16",
                padding_free=padding_free,
                padding_free_row_tokens=200 if padding_free else None,  # several sequences share a row
            )
            ratios = [(entry["gspo/seq_ratio/min"], entry["gspo/seq_ratio/max"]) for entry in logs]
            first = [entry[FIRST_STEP] for entry in logs if FIRST_STEP in entry]
            runs.append(
                {
                    "precision": precision_name,
                    "accelerate_mixed_precision": trainer.accelerator.mixed_precision,
                    "padding_free": padding_free,
                    "seq_ratio_min_max": ratios,
                    "first_step_outside_clip_band": first,
                    "exact": bool(first)
                    and all(lo == hi == 1.0 for lo, hi in ratios)
                    and all(v == 0.0 for v in first),
                }
            )
    return {"runs": runs, "all_exact": all(run["exact"] for run in runs)}


# --- 4. GSPOTrainer against GRPOTrainer on the ragged workload --------------------------------------------------------


def trainer_ab(device: str, plan: dict) -> dict:
    from gspo_benchmarks.trainer_ab import run_trial_subprocess

    ab = plan["ab"]
    shape = SHAPES.get(ab["shape"], {})
    spec = dict(
        shape=ab["shape"],
        model_type=shape.get("model_type", "qwen2"),
        hidden_size=shape.get("hidden_size", 64),
        num_layers=ab["num_layers"] or shape["num_layers"],
        num_heads=shape.get("num_heads", 4),
        completion_length=ab["completion_length"],
        num_generations=8,
        batch_size=8,
        steps=ab["steps"],
        bf16=device == "cuda",
        device=device,
        seed=0,
        threads=None if device == "cuda" else 1,
        suppress_eos=False,
        workload="ragged",
        row_tokens=None,
    )
    trials = {}
    for label, overrides in (
        ("trl_padded", {"trainer": "trl"}),
        ("gspo_padded", {"trainer": "gspo"}),
        ("gspo_padding_free", {"trainer": "gspo", "padding_free": True}),
    ):
        print(f"# trainer_ab {label}", file=sys.stderr, flush=True)
        trials[label] = run_trial_subprocess({**spec, **overrides})
    memory = "peak_gpu_mib" if device == "cuda" else "peak_rss_mib"
    base = trials["trl_padded"]
    ratios = {
        label: {
            "step_s_ratio": trial["step_s_all"] / base["step_s_all"],
            f"{memory}_ratio": trial[memory] / base[memory],
        }
        for label, trial in trials.items()
        if label != "trl_padded"
    }
    return {
        "spec": spec,
        "attention": "sdpa (transformers' default; padding_free allows sdpa/eager/flash_attention_2/3, not torch's "
        "flex_attention, and flash-attention cannot be carried)",
        "trials": trials,
        "vs_trl_padded": ratios,
    }


# --- 5. MoE -----------------------------------------------------------------------------------------------------------


def moe(device: str) -> dict:
    """One rollout of 4 bf16 steps on a tiny Qwen3-MoE per setting of MOE_SETTINGS, with its moe/* metrics."""
    keep = ("loss", "gspo/seq_ratio/min", "gspo/seq_ratio/max", FIRST_STEP, "gspo/clip_ratio/region_mean")
    results = {}
    for label, overrides in MOE_SETTINGS.items():
        _, logs = train_tiny(device, "qwen3_moe", learning_rate=1e-3, bf16=True, **overrides)
        results[label] = [
            {key: value for key, value in entry.items() if key in keep or key.startswith("moe/")} for entry in logs
        ]
    return results


# --- report -----------------------------------------------------------------------------------------------------------


def report(result: dict) -> str:
    lines = [f"# GSPO GPU check ({result['mode']}, {result['environment'].get('gpu', 'no GPU')})", ""]
    env = result["environment"]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    lines.append("unmet requirements: " + ("; ".join(env["unmet_requirements"]) or "none"))
    for name, section in result["sections"].items():
        lines += ["", f"## {name} ({section['seconds']:.0f} s)"]
        if "error" in section or "skipped" in section:
            lines.append(section.get("skipped") or section["error"].strip().splitlines()[-1])
            continue
        data = section["result"]
        if name == "precision":
            lines += [data["summary"], "", "forward cost (ms): " + json.dumps(data["forward_cost"])]
        elif name == "first_step":
            lines.append(f"every ratio exactly 1 and the first-step metric 0 in every run: {data['all_exact']}")
            for run in data["runs"]:
                lines.append(
                    f"- {run['precision']} ({run['accelerate_mixed_precision']}), padding_free={run['padding_free']}: "
                    f"exact={run['exact']}, ratio min/max {run['seq_ratio_min_max']}, first step "
                    f"{run['first_step_outside_clip_band']}"
                )
        elif name == "trainer_ab":
            for label, trial in data["trials"].items():
                memory = trial.get("peak_gpu_mib", trial["peak_rss_mib"])
                lines.append(
                    f"- {label}: step {trial['step_s_all'] * 1e3:.1f} ms (median), peak memory {memory:.0f} MiB, "
                    f"padded share of log-prob slots {trial['padded_share']:.1%}"
                )
            lines.append("vs TRL padded: " + json.dumps(data["vs_trl_padded"]))
        elif name == "moe":
            for label, logs in data.items():
                lines.append(f"- {label}: {logs if isinstance(logs, str) else logs[-1]}")
    return "\n".join(lines)


SECTIONS = ("precision", "first_step", "trainer_ab", "moe")


def run(device: str, budget_s: float, only=SECTIONS) -> dict:
    plan = DEVICE_PLAN if device == "cuda" else CPU_PLAN
    calls = {
        "precision": lambda: precision(device, plan),
        "first_step": lambda: first_step(device),
        "trainer_ab": lambda: trainer_ab(device, plan),
        "moe": lambda: moe(device),
    }
    start = time.perf_counter()
    result = {"mode": device, "environment": environment(device), "sections": {}}
    for name in only:
        section_start = time.perf_counter()
        if section_start - start > budget_s:
            result["sections"][name] = {"skipped": f"skipped: past the {budget_s:.0f} s budget", "seconds": 0.0}
            continue
        print(f"# section {name}", file=sys.stderr, flush=True)
        try:
            result["sections"][name] = {"result": calls[name]()}
        except Exception:  # recorded; the next section still runs
            result["sections"][name] = {"error": traceback.format_exc()}
        result["sections"][name]["seconds"] = time.perf_counter() - section_start
    result["total_seconds"] = time.perf_counter() - start
    result["report"] = report(result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the results file (JSON)")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (also chosen without CUDA)")
    parser.add_argument("--budget-s", type=float, default=480, help="sections starting later are skipped")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    result = run(device, args.budget_s, args.sections)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(result["report"])
    failed = [name for name, section in result["sections"].items() if "error" in section]
    return 1 if failed or result["environment"]["unmet_requirements"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
