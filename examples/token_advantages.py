"""Other ways to form GSPO-token's token component, for the comparison (gspo_examples.compare, docs/COMPARISON.md).

GSPOTrainer forms the component with `trl_gspo.token_rewards.group_centred_component`, ``(r_it - mu_g) /
(sigma_g + 1e-4)`` over the group's loss tokens. Each formulation here is a pure function of the same arguments
(`TOKEN_ADVANTAGES`, by name); `token_advantage_trainer(name)` is GSPOTrainer with that function as its
`token_advantage_component`. On the built-in tasks none beat the default and ``"return_to_go"`` hurt
(docs/COMPARISON.md):

- ``"scaled"``: ``r_it / (sigma_g + 1e-4)``, no centring: unmarked tokens get 0.
- ``"marked_only"``: the group_centred value on tokens with ``r_it != 0``, 0 on the others.
- ``"position_baseline"``: ``(r_it - b_gt) / (s_g + 1e-4)``, ``b_gt`` the mean of ``r_it`` over the group's
  completions at position ``t``, ``s_g`` the std of those deviations over the group: each token is compared with
  the other completions' tokens at its position.
- ``"return_to_go"``: ``R_it / (sigma_g(R) + 1e-4)``, ``R_it`` the sum of the token values from ``t`` to the end of
  the completion (the tokens that can have caused them), no centring.

Each gives exactly 0 to a group whose token values are all 0, so a run without token-level rewards trains exactly as
GSPO under every formulation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trl_gspo.token_rewards import (
    TOKEN_STD_EPS,
    check_groups,
    group_centred_component,
    group_stats,
    masked_spread_positive,
)
from trl_gspo.trainer import GSPOTrainer


def scaled_component(
    token_rewards: torch.Tensor, mask: torch.Tensor, num_generations: int, eps: float = TOKEN_STD_EPS
) -> torch.Tensor:
    """(N, T) "scaled" component r_it / (sigma_g + eps), 0 off the mask: group_centred without the centring.

    Shapes as `group_centred_component`; sigma_g the same (unbiased std of the group's masked r_it), a constant
    group (or one with fewer than two masked tokens) gets 0. Unmarked tokens get exactly 0 whatever the marks of
    the other completions, so a negative span only pushes down the tokens it covers.
    """
    rows, width = token_rewards.shape
    check_groups(rows, num_generations)
    r = token_rewards.double().reshape(-1, num_generations * width)
    m = mask.double().reshape(-1, num_generations * width)
    _, inverse_scale, constant = group_stats(r, m, eps)
    component = torch.where(constant, torch.zeros_like(r), r * m * inverse_scale)
    return component.reshape(rows, width).to(token_rewards.dtype)


def marked_only_component(
    token_rewards: torch.Tensor, mask: torch.Tensor, num_generations: int, eps: float = TOKEN_STD_EPS
) -> torch.Tensor:
    """(N, T) "marked_only" component: group_centred's value on tokens with r_it != 0, 0 on every other token.

    Shapes as `group_centred_component` (mu_g, sigma_g over all the group's masked tokens). Only the tokens a
    reward marked get credit; the unmarked ones (the eos included) keep the sequence advantage alone.
    """
    centred = group_centred_component(token_rewards, mask, num_generations, eps)
    return torch.where(token_rewards != 0, centred, torch.zeros_like(centred))


def position_baseline_component(
    token_rewards: torch.Tensor, mask: torch.Tensor, num_generations: int, eps: float = TOKEN_STD_EPS
) -> torch.Tensor:
    """(N, T) "position_baseline" component (r_it - b_gt) / (s_g + eps), 0 off the mask.

    Shapes as `group_centred_component`. b_gt is the mean of r_it over the completions i of group g that have a
    loss token at position t; d_it = r_it - b_gt (exactly 0 at a position whose masked values are all equal,
    e.g. held by one completion only); s_g the unbiased std of d_it over the group's masked tokens, taken around
    0 (the d_it of a position sum to 0). A group where every d_it is 0 gets exactly 0. Each token is compared with
    the other completions' tokens at the same position, so a mark common to the whole group cancels out.
    """
    rows, width = token_rewards.shape
    check_groups(rows, num_generations)
    r = token_rewards.double().reshape(-1, num_generations, width)
    m = mask.double().reshape(-1, num_generations, width)
    count = m.sum(1, keepdim=True)
    baseline = (r * m).sum(1, keepdim=True) / count.clamp(min=1.0)
    varies = masked_spread_positive(r, m, 1)  # (groups, 1, T)
    deviation = torch.where(varies, (r - baseline) * m, torch.zeros_like(r)).reshape(-1, num_generations * width)
    flat_mask = m.reshape(-1, num_generations * width)
    tokens = flat_mask.sum(-1, keepdim=True)
    std = ((deviation**2).sum(-1, keepdim=True) / (tokens - 1).clamp(min=1.0)).sqrt()
    constant = (tokens < 2) | ~varies.flatten(1).any(-1, keepdim=True)
    component = torch.where(constant, torch.zeros_like(deviation), deviation / (std + eps))
    return component.reshape(rows, width).to(token_rewards.dtype)


def return_to_go_component(
    token_rewards: torch.Tensor, mask: torch.Tensor, num_generations: int, eps: float = TOKEN_STD_EPS
) -> torch.Tensor:
    """(N, T) "return_to_go" component R_it / (sigma_g(R) + eps), 0 off the mask, R_it = sum_{s >= t} m_is r_is.

    Shapes as `group_centred_component`. Each token is credited with the token rewards from it to the end of its
    completion (the tokens that can have caused them), scaled without centring by the unbiased std of R over the
    group's masked tokens; a group whose masked R are all equal gets exactly 0. A mark at position k lowers
    every token up to k, none after it.
    """
    rows, width = token_rewards.shape
    check_groups(rows, num_generations)
    masked = token_rewards.double() * mask.double()
    to_go = masked.flip(-1).cumsum(-1).flip(-1) * mask.double()
    return scaled_component(to_go, mask, num_generations, eps).to(token_rewards.dtype)


# name -> component function; "group_centred" is GSPOTrainer's own
TOKEN_ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "group_centred": group_centred_component,
    "scaled": scaled_component,
    "marked_only": marked_only_component,
    "position_baseline": position_baseline_component,
    "return_to_go": return_to_go_component,
}


def token_advantage_trainer(name: str) -> type[GSPOTrainer]:
    """GSPOTrainer, or for another name of `TOKEN_ADVANTAGES` a subclass whose token component is that formulation."""
    if name not in TOKEN_ADVANTAGES:
        raise ValueError(f"unknown token advantage {name!r}; expected one of {', '.join(TOKEN_ADVANTAGES)}")
    if TOKEN_ADVANTAGES[name] is group_centred_component:
        return GSPOTrainer
    component = TOKEN_ADVANTAGES[name]

    def token_advantage_component(self, token_rewards, mask, num_generations):
        return component(token_rewards, mask, num_generations)

    return type(f"GSPOTrainer_{name}", (GSPOTrainer,), {"token_advantage_component": token_advantage_component})
