"""Mixture-of-Experts routing: no router logits in generate(), the routing drift metric, routing replay (R2).

Pure functions (tested against naive references) and one hook manager, `RouterHooks`; GSPOTrainer only wires
them into the rollout and the loss (see its `_moe_*` methods).

How it works. transformers' MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) route each token in a `*TopKRouter`
module that returns (router_logits, top_k_weights, top_k_index); every experts implementation takes its
indices from there, so a forward hook on the routers sees, and can replace, the routing of the whole model.

- pi_old pass (inside `_generate_and_score_completions`, once per rollout): the hooks record each router's
  top-k indices for every position of every row (prompt and completion), shape (B, L, layers, k). The tensor
  rides in the rollout batch under `ROUTING_KEY`, so TRL's shuffle and split carry it with its rows.
  `generate()` and the reference pass are not recorded.
- policy pass (in `compute_loss`): the hooks observe the current routing (drift metric) and, with replay,
  return the recorded indices instead, with weights recomputed from the *current* router logits at those
  indices (`replay_weights`), so the router still gets gradients. The replay state lives until backward has
  finished: gradient checkpointing re-runs the router during backward and must see the same experts.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# Batch key of the recorded pi_old routing (B, L, layers, k); its first dimension is the batch, so it travels
# through TRL's shuffle_sequence_dict / split_tensor_dict with the rows it belongs to.
ROUTING_KEY = "moe_routing"
ROUTER_CLASS_SUFFIX = "TopKRouter"


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The `*TopKRouter` modules of `model` in layer order (empty for a dense model)."""
    return [module for module in model.modules() if type(module).__name__.endswith(ROUTER_CLASS_SUFFIX)]


@contextlib.contextmanager
def router_logits_off(model: nn.Module):
    """Set `output_router_logits=False` in the model's (text) config for the duration of the block.

    With `output_router_logits=True` in the config, transformers' MoE models compute the load-balancing loss on
    every forward, in cached decoding too, where it combines the full attention mask with the router logits of the
    new tokens only: a shape error as soon as the batch is padded. Generation needs no router logits; TRL's
    training forward passes `output_router_logits=True` explicitly when the aux loss is enabled, so it is unaffected.
    """
    config = model.config.get_text_config() if hasattr(model, "config") else None
    if config is None or not getattr(config, "output_router_logits", False):
        yield
        return
    config.output_router_logits = False
    try:
        yield
    finally:
        config.output_router_logits = True


def index_dtype(num_experts: int) -> torch.dtype:
    """Smallest integer dtype that holds expert indices 0..num_experts-1 (the record is B x L x layers x k)."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def replay_weights(
    router_logits: torch.Tensor, indices: torch.Tensor, normalize: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Routing weights of the experts `indices` (N, k) under the current `router_logits` (N, E).

    The same arithmetic as the routers (softmax in float32, gather, optional renormalisation over the k chosen),
    so with unchanged logits and recorded indices it reproduces the router's own weights bit for bit; it is
    differentiable in the logits, so the router gets gradients through the replayed experts' weights.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights = probs.gather(-1, indices)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype)


def routing_drift_counts(recorded: torch.Tensor, current: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Counts for the routing drift between two routings of the same tokens.

    Args:
        recorded, current: (B, T, layers, k) expert indices (order within k ignored: sets are compared).
        mask: (B, T), 1 for the tokens to count (completion tokens), 0 for padding.

    Returns a float tensor [changed (token, layer) pairs, (token, layer) pairs, tokens changed in at least one
    layer, tokens], so that sums over micro-batches and processes give exact fractions.
    """
    same = (recorded.long().sort(dim=-1).values == current.long().sort(dim=-1).values).all(dim=-1)  # (B, T, layers)
    mask = mask.bool()
    changed = ~same & mask.unsqueeze(-1)
    tokens = mask.sum()
    return torch.stack([changed.sum(), tokens * same.size(-1), changed.any(dim=-1).sum(), tokens]).float()


def drift_fractions(counts: torch.Tensor) -> dict[str, float]:
    """`routing_drift_counts` (summed) -> the logged metrics; empty when there was no token to count."""
    changed_pairs, pairs, changed_tokens, tokens = counts.tolist()
    if tokens == 0:
        return {}
    return {
        "moe/routing_drift/token_layer": changed_pairs / pairs,
        "moe/routing_drift/token_any_layer": changed_tokens / tokens,
    }


class RouterHooks:
    """Forward hooks on every router of a model: record the routing, observe it, or replay a recorded one.

    Idle unless told otherwise, so generate() and reference passes go through untouched. One state at a time:
      `recording()`                a context; every router call appends its indices (any number of chunks)
      `recorded(batch, length)`    the record of the last `recording()` as (B, L, layers, k)
      `start_policy_pass(routing, replay)`  observe the current routing and, with replay, force `routing`
                                    (B, L, layers, k); stays on (for backward recomputation) until `clear()`
      `observed(batch, length)`    the current routing seen in the policy pass, (B, L, layers, k)
    """

    def __init__(self, routers: list[nn.Module]):
        if not routers:
            raise ValueError("RouterHooks needs at least one *TopKRouter module; the model has none.")
        self.routers = routers
        self.top_k = routers[0].top_k
        self.dtype = index_dtype(routers[0].num_experts)
        self._mode = "idle"
        self._chunks: list[list[torch.Tensor]] = [[] for _ in routers]
        self._observed: list[torch.Tensor | None] = [None] * len(routers)
        self._replay: torch.Tensor | None = None
        self._handles = [router.register_forward_hook(self._hook(i)) for i, router in enumerate(routers)]

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def clear(self) -> None:
        """Back to idle; drops any replay state (call once backward of the policy pass has finished)."""
        self._mode = "idle"
        self._replay = None
        self._observed = [None] * len(self.routers)

    @contextlib.contextmanager
    def recording(self):
        self.clear()
        self._chunks = [[] for _ in self.routers]
        self._mode = "record"
        try:
            yield
        finally:
            self._mode = "idle"

    def recorded(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """The last recording as (B, L, layers, k), chunks concatenated in call order (TRL chunks along rows)."""
        layers = [torch.cat(chunks).view(batch_size, seq_len, self.top_k) for chunks in self._chunks]
        self._chunks = [[] for _ in self.routers]
        return torch.stack(layers, dim=2).to(self.dtype)

    def start_policy_pass(self, routing: torch.Tensor, replay: bool) -> None:
        self.clear()
        self._mode = "policy"
        self._replay = routing if replay else None

    def observed(self, batch_size: int, seq_len: int) -> torch.Tensor:
        if any(o is None for o in self._observed):
            raise RuntimeError("RouterHooks.observed: not every router ran since start_policy_pass.")
        return torch.stack([o.view(batch_size, seq_len, self.top_k) for o in self._observed], dim=2)

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self._mode == "idle":
                return None
            router_logits, weights, indices = output
            if self._mode == "record":
                self._chunks[layer].append(indices.detach())
                return None
            # policy pass; gradient checkpointing calls this again in backward, with the same result
            self._observed[layer] = indices.detach()
            if self._replay is None:
                return None
            forced = self._replay[:, :, layer].reshape(-1, indices.size(-1)).to(indices.device, indices.dtype)
            if forced.size(0) != indices.size(0):
                raise RuntimeError(
                    f"routing replay: layer {layer} routes {indices.size(0)} tokens but the recorded routing holds "
                    f"{forced.size(0)} (rows x length of the rollout batch); the policy forward must see the same "
                    "padded rows as the pi_old pass."
                )
            normalize = getattr(module, "norm_topk_prob", True)  # Mixtral's router always renormalises
            return router_logits, replay_weights(router_logits, forced, normalize, weights.dtype), forced

        return hook
