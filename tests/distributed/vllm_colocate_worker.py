"""Worker for tests/distributed/test_vllm_colocate_launch.py: GSPOTrainer with a colocated vLLM engine (float32) in
each process of whatever `accelerate launch` set up, the weight sync checked on every rank (tests/vllm_sync.py).

    vllm_colocate_worker.py MODEL_DIR OUT_DIR

Each rank writes OUT_DIR/rank<i>.json: {"world_size", "distributed_type", "zero_stage", "partitioned_params",
"num_params", "losses", "gaps", "trainer_logps"} (`gaps`: per sync, the largest engine-vs-trainer token gap of the
fixed sequence on this rank's engine).
"""

import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # TRL's colocate mode reaches into the engine
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared dataset, reward and sync check

import torch  # noqa: E402
from conftest import completion_length_reward, prompt_dataset, small_config  # noqa: E402
from train_worker import skip_deepspeed_shm_op  # noqa: E402
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: E402
from vllm_sync import SyncRecorder  # noqa: E402

from trl_gspo import GSPOTrainer  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    skip_deepspeed_shm_op()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = small_config(
        out_dir,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_dtype="float32",
        vllm_importance_sampling_correction=False,
        per_device_train_batch_size=8 // world,
        steps_per_generation=2,
        max_steps=4,  # rollouts at steps 0 and 2, 2 optimizer steps on each
    )
    trainer = GSPOTrainer(model_dir, completion_length_reward, args=args, train_dataset=prompt_dataset("standard"))
    syncs = SyncRecorder(trainer)
    trainer.train()

    state = trainer.accelerator.state
    plugin = state.deepspeed_plugin
    params = list(trainer.model.parameters())
    result = {
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "zero_stage": plugin.deepspeed_config["zero_optimization"]["stage"] if plugin is not None else None,
        "partitioned_params": sum(hasattr(p, "ds_id") for p in params),
        "num_params": len(params),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "gaps": syncs.gaps,
        "trainer_logps": syncs.trainer_logps,
    }
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()
    # vLLM's engine shares the process group; its own teardown destroys it (a destroy_process_group before it makes
    # the engine's shutdown at exit fail on the missing group)
    del trainer.vllm_generation.llm
    gc.collect()
    cleanup_dist_env_and_memory()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
