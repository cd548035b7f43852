"""Worker for tests/distributed/test_launch.py: a fixed-seed tiny GSPO run under whatever
`accelerate launch` set up.

    train_worker.py OUT.json [DEEPSPEED_CONFIG_JSON | "" | null] [OPTIONS_JSON]

OPTIONS: {"model_type": "qwen3"|"qwen3_moe", "lora": bool, ...}: every other key is a GSPOConfig field (e.g.
"routing_replay", "padding_free", "use_rollout_logprobs"). Writes (main process only) {"world_size",
"distributed_type", "losses", "logs", "rollout_mismatch", "sharding"}: `sharding` says what the backend really did
with the parameters (FSDP2: DTensor shards; ZeRO-3: partitioned parameters and where they live).

On CPU, accelerate builds a MULTI_CPU state and then silently ignores an FSDP config (it only turns FSDP on from
MULTI_GPU): when the launcher asked for FSDP (ACCELERATE_USE_FSDP) and there is no GPU, the backend choice is
built on CPU (gloo) and then marked MULTI_GPU before the accelerator state is built, so the FSDP plugin is really
applied (the test asserts the parameters are DTensor shards).
"""

import importlib
import json
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset

from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm
from trl_gspo import GSPOConfig, GSPOTrainer


def reward(completions, **kwargs):
    return [float(len(c[-1]["content"]) % 4) for c in completions]


def force_fsdp_on_cpu():
    """Mark the (singleton) CPU process state MULTI_GPU so that the Accelerator built next applies FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return
    state = PartialState(cpu=True)
    state.distributed_type = DistributedType.MULTI_GPU


def skip_deepspeed_shm_op():
    """DeepSpeed on CPU builds (C++ compile, minutes under load, rebuilt whenever another venv touched the shared
    cache) a shared-memory all-reduce op that only speeds up collectives; without it, it uses torch.distributed."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # the module itself: `deepspeed.comm.torch` as an attribute is PyTorch (deepspeed.comm imports torch)
        ds_torch_backend = importlib.import_module("deepspeed.comm.torch")
        ds_torch_backend.build_shm_op = lambda: None


def local_numel(param) -> int:
    """Elements this process holds: its DTensor shard (FSDP2), its ZeRO-3 partition, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local().numel()
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel()
    return param.numel()


def describe_sharding(trainer) -> dict:
    """What the backend did to the parameters, read from the model itself."""
    from torch.distributed.tensor import DTensor

    params = list(trainer.model_wrapped.parameters())
    plugin = trainer.accelerator.state.deepspeed_plugin
    ds_config = plugin.deepspeed_config if plugin is not None else {}
    return {
        "wrapper": type(trainer.model_wrapped).__name__,
        "zero_stage": ds_config.get("zero_optimization", {}).get("stage"),
        "offload_param": ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device"),
        "offload_optimizer": ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device"),
        "dtensor_params": sum(isinstance(p, DTensor) for p in params),
        "zero3_partitioned_params": sum(hasattr(p, "ds_id") for p in params),
        "num_params": len(params),
        "local_numel": sum(local_numel(p) for p in params),
        "full_numel": sum(p.numel() if not hasattr(p, "ds_numel") else p.ds_numel for p in params),
    }


def main(out_path, deepspeed_config=None, options=None):
    options = dict(options or {})
    model_type, lora = options.pop("model_type", "qwen3"), options.pop("lora", False)
    torch.set_num_threads(1)
    skip_deepspeed_shm_op()
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, model_type=model_type, hidden_size=32, seed=0)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i % 7}="}] for i in range(32)]})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GSPOConfig(
        output_dir="/tmp/trl_gspo_dist",
        per_device_train_batch_size=8 // world,  # the same global batch whatever the world size
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        deepspeed=deepspeed_config,
        **options,
    )
    force_fsdp_on_cpu()  # after the training arguments, which rebuild the process state
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    trainer = GSPOTrainer(
        model, reward, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    sharding = describe_sharding(trainer)
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        state = trainer.accelerator.state
        with open(out_path, "w") as f:
            json.dump(
                {
                    "world_size": state.num_processes,
                    "distributed_type": str(state.distributed_type),
                    "losses": [h["loss"] for h in logs],
                    "logs": logs,
                    "rollout_mismatch": [
                        h["gspo/rollout_logprobs/seq_abs_log_ratio_max"]
                        for h in trainer.state.log_history
                        if "gspo/rollout_logprobs/seq_abs_log_ratio_max" in h
                    ],
                    "sharding": sharding,
                },
                f,
            )
    finish_rank(trainer.accelerator)


def finish_rank(accelerator):
    """End this rank once every rank has finished: an orderly process-group shutdown, then an exit that skips the
    interpreter's finalization. There, gloo's C++ threads can still hold work objects whose tensors need the
    interpreter being torn down, and the rank aborts ("terminate called without an active exception": seen under
    load with FSDP2 on CPU once training had finished, destroy_process_group called or not; pytorch/pytorch#179291)."""
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    deepspeed = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] else None
    main(sys.argv[1], deepspeed, json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
