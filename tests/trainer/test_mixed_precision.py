"""GSPOConfig(fp16=True): what accelerate makes of it, and that a few GSPO steps train under it.

On a CPU accelerate records mixed_precision "fp16" but enables native AMP (fp16 autocast and a GradScaler) only on
an accelerator device (`Accelerator.__init__`: `mixed_precision == "fp16" and device.type != "cpu"`), so a CPU run
with fp16=True trains in float32 and has no loss scaling. The CPU test pins that down; the CUDA test checks the
real route: fp16 matmuls under autocast, the loss scaled by the Trainer's GradScaler.
"""

import math

import pytest
import torch
from conftest import small_trainer


def train_and_watch(trainer):
    """Train; return the dtypes one MLP projection produced, the logged losses and which parameters moved."""
    dtypes = set()
    projection = trainer.model.model.layers[0].mlp.down_proj
    hook = projection.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    try:
        trainer.train()
    finally:
        hook.remove()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p.detach())]
    return dtypes, losses, moved


def test_fp16_on_the_cpu_trains_in_float32_without_a_grad_scaler(make_model, tokenizer, tmp_path):
    trainer = small_trainer(make_model(), tokenizer, tmp_path, fp16=True, max_steps=3)
    accelerator = trainer.accelerator
    assert accelerator.device.type == "cpu"
    assert accelerator.mixed_precision == "fp16"  # recorded as asked ...
    assert not accelerator.native_amp and accelerator.scaler is None  # ... but neither autocast nor loss scaling

    dtypes, losses, moved = train_and_watch(trainer)

    assert dtypes == {torch.float32}  # the forward really is float32: fp16=True changes nothing on a CPU
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    assert len(moved) == len(list(trainer.model.parameters())), moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs a CUDA device")
def test_fp16_on_cuda_trains_with_loss_scaling(make_model, tokenizer, tmp_path):
    trainer = small_trainer(make_model(), tokenizer, tmp_path, fp16=True, use_cpu=False, max_steps=3)
    accelerator = trainer.accelerator
    assert accelerator.native_amp and isinstance(accelerator.scaler, torch.amp.GradScaler)

    dtypes, losses, moved = train_and_watch(trainer)

    assert torch.float16 in dtypes
    assert next(trainer.model.parameters()).dtype == torch.float32  # float32 master weights
    assert math.isfinite(accelerator.scaler.get_scale()) and accelerator.scaler.get_scale() > 0
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    assert moved
