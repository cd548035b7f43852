"""trl_gspo: Group Sequence Policy Optimization (arXiv 2507.18071) for Hugging Face TRL.

- `trl_gspo.objective`: the GSPO / GSPO-token loss as pure tensor functions.
- `trl_gspo.config.GSPOConfig`: GRPOConfig with the paper's defaults, validated at construction.
- `trl_gspo.trainer.GSPOTrainer`: GRPOTrainer with the GSPO objective (a drop-in replacement); its core owns the
  training step and calls the features it was configured with: `pi_old` (with `rollout_logprobs`), `packing`, `moe`,
  `token_rewards`, `diagnostics`, `vllm_checks` (with `vllm_cpu`), `noise`; `trl_api`: the private TRL API relied on.
"""

from .config import (
    GSPOClipRangeWarning,
    GSPOConfig,
    GSPOOnPolicyWarning,
    GSPOPrecisionWarning,
    GSPOUnusedSettingWarning,
)
from .objective import compute_policy_objective, sequence_log_ratio
from .trainer import GSPOTrainer

__version__ = "0.1.0"

__all__ = [
    "GSPOClipRangeWarning",
    "GSPOConfig",
    "GSPOOnPolicyWarning",
    "GSPOPrecisionWarning",
    "GSPOUnusedSettingWarning",
    "GSPOTrainer",
    "compute_policy_objective",
    "sequence_log_ratio",
]
