"""GSPOTrainer with vLLM in colocate mode, one process, the engine on the CPU (`make test-vllm`: .venv-vllm).

vLLM's engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so each test builds its trainer inside
`colocated_trainer`, which bounds the test by a deadline and tears the engine down whatever happens.
"""

import gc
import math
import os
import signal
from contextlib import contextmanager

import pytest

pytest.importorskip("vllm", reason="vLLM tests run in .venv-vllm: make test-vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # TRL's colocate mode reaches into the engine

import torch  # noqa: E402
from conftest import completion_length_reward, prompt_dataset, small_config  # noqa: E402
from trl.generation.vllm_generation import VLLMGeneration  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: E402

from gspo_examples.tiny import save_tiny_model  # noqa: E402
from trl_gspo import GSPOTrainer  # noqa: E402

ENGINE_DEADLINE_S = 120  # engine start about 15 s on 2 shared cores, plus a few steps
FLOAT32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    # vLLM's CPU attention needs head_dim 64 (it refuses 16): hidden 128 with 2 heads. Qwen3, not Qwen2: a qwen2
    # folder reloads the character tokenizer as the byte-level Qwen2Tokenizer (examples/tiny.py)
    path = tmp_path_factory.mktemp("tiny_qwen3")
    return save_tiny_model(path, model_type="qwen3", hidden_size=128, num_heads=2, num_layers=2)


@contextmanager
def deadline(seconds):
    """Raise TimeoutError in the test if the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"vLLM test ran past its {seconds} s deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def colocated_trainer(model_dir, output_dir, **overrides):
    """A GSPOTrainer generating with a colocated vLLM engine; the engine is shut down on exit, even on failure."""
    values = dict(
        use_vllm=True,
        vllm_mode="colocate",
        vllm_dtype="float32",
        vllm_importance_sampling_correction=False,
        steps_per_generation=2,
        max_steps=2,
        max_completion_length=8,
    )
    values.update(overrides)
    trainer = None
    try:
        with deadline(ENGINE_DEADLINE_S):
            trainer = GSPOTrainer(
                model_dir,
                completion_length_reward,
                args=small_config(output_dir, **values),
                train_dataset=prompt_dataset("standard"),
            )
            yield trainer
    finally:
        if trainer is not None and hasattr(trainer, "vllm_generation"):
            del trainer.vllm_generation.llm
        del trainer
        gc.collect()
        cleanup_dist_env_and_memory()


def fixed_sequence(trainer):
    """A prompt and a completion of the trainer's tokenizer, as token ids."""
    tokenizer = trainer.processing_class
    return tokenizer("12+5=", add_special_tokens=False)["input_ids"], tokenizer("17;34+1", add_special_tokens=False)[
        "input_ids"
    ]


def engine_logprobs(trainer, prompt_ids, completion_ids) -> torch.Tensor:
    """The engine's log-probs of `completion_ids` after `prompt_ids` (its prompt log-probs, temperature 1)."""
    ids = prompt_ids + completion_ids
    params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    [output] = trainer.vllm_generation.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    per_position = output.prompt_logprobs[len(prompt_ids) :]
    return torch.tensor([entry[token].logprob for entry, token in zip(per_position, completion_ids)])


def trainer_logprobs(trainer, prompt_ids, completion_ids) -> torch.Tensor:
    """The training model's log-probs of the same tokens: one plain float32 forward."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits.float()
    logps = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1], dim=-1)
    return logps.gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1)


def max_gap(trainer, sequence) -> float:
    return (engine_logprobs(trainer, *sequence) - trainer_logprobs(trainer, *sequence)).abs().max().item()


class RolloutForwards:
    """Per rollout, the training model's forwards while it is generated and scored (beta=0: only the pi_old pass);
    the test's own forwards (inside `paused`) are not counted."""

    def __init__(self, trainer):
        self.per_rollout, self._scoring, self._paused = [], False, False
        score = trainer._generate_and_score_completions

        def scoring(inputs):
            self.per_rollout.append(0)
            self._scoring = True
            try:
                return score(inputs)
            finally:
                self._scoring = False

        trainer._generate_and_score_completions = scoring
        trainer.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        if self._scoring and not self._paused:
            self.per_rollout[-1] += 1

    @contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def record_syncs(trainer, sequence, forwards):
    """The trainer's log-probs of `sequence` at each weight sync, as the engine should hold them after it."""
    at_sync = []
    sync = trainer.vllm_generation.sync_weights

    def recording_sync():
        sync()
        with forwards.paused():
            at_sync.append(trainer_logprobs(trainer, *sequence))

    trainer.vllm_generation.sync_weights = recording_sync
    return at_sync


def logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def test_colocate_trains_and_each_sync_makes_the_engine_the_trainer(tiny_model_dir, tmp_path):
    overrides = dict(max_steps=4, use_rollout_logprobs=True, rollout_logprobs_check_interval=2)
    with colocated_trainer(tiny_model_dir, tmp_path, **overrides) as trainer:
        sequence = fixed_sequence(trainer)
        assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.float32
        assert max_gap(trainer, sequence) < FLOAT32_TOLERANCE  # the engine loaded the checkpoint
        forwards = RolloutForwards(trainer)
        at_sync = record_syncs(trainer, sequence, forwards)

        trainer.train()  # rollouts at steps 0 and 2, each after a sync; 2 optimizer steps on each
        losses = logged(trainer, "loss")
        assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
        # rollout log-probs answer pi_old: the first rollout is checked with a forward (2 micro-batches of 8), the
        # second skips it
        assert forwards.per_rollout == [2, 0]
        [mismatch] = logged(trainer, "gspo/rollout_logprobs/seq_abs_log_ratio_mean")
        print(f"float32 engine: sequence mismatch {mismatch:.2e}")
        assert mismatch < FLOAT32_TOLERANCE  # a float32 engine samples from the trainer's distribution

        # the engine holds the weights of the last sync; the 2 optimizer steps since are not in it
        assert len(at_sync) == 2
        stale = engine_logprobs(trainer, *sequence)
        assert (stale - at_sync[-1]).abs().max().item() < FLOAT32_TOLERANCE
        assert max_gap(trainer, sequence) > 100 * FLOAT32_TOLERANCE  # a skipped or early sync is seen

        stale_gap = max_gap(trainer, sequence)
        trainer.vllm_generation.sync_weights()
        synced_gap = max_gap(trainer, sequence)
        print(f"float32 engine: token gap {stale_gap:.2e} before the sync, {synced_gap:.2e} after")
        assert synced_gap < FLOAT32_TOLERANCE

        # why the mixin replaces TRL's sync on a CPU engine: TRL's own fails at the first parameter
        with pytest.raises(AttributeError, match="weight_loader"):
            VLLMGeneration.sync_weights(trainer.vllm_generation)


def test_bfloat16_engine_mismatch_is_what_rollout_logprobs_report(tiny_model_dir, tmp_path):
    overrides = dict(vllm_dtype="auto", use_rollout_logprobs=True, rollout_logprobs_check_interval=1)
    with colocated_trainer(tiny_model_dir, tmp_path, **overrides) as trainer:
        # TRL's colocate mode passes no dtype: vLLM serves the float32 checkpoint in bfloat16 on a CPU
        assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.bfloat16
        sequence = fixed_sequence(trainer)
        gap = max_gap(trainer, sequence)
        trainer.train()
        [mismatch] = logged(trainer, "gspo/rollout_logprobs/seq_abs_log_ratio_mean")
        print(f"bfloat16 engine: token gap {gap:.2e}, sequence mismatch {mismatch:.2e}")
        assert gap > 100 * FLOAT32_TOLERANCE
        assert mismatch > 10 * FLOAT32_TOLERANCE
