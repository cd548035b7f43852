"""Mixture-of-Experts routing: no router logits in generate(), the routing drift metric, routing replay (R2).

Pure functions (tested against naive references), one hook manager, `RouterHooks`, and the trainer mixin
`MoERoutingMixin` that wires them into the rollout and the loss (on GSPOTrainer or TRL's plain GRPOTrainer).

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
from transformers.utils import logging

from .config import pi_old_pass_runs

logger = logging.get_logger(__name__)

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


class MoERoutingMixin:
    """Trainer mixin for MoE models: no router logits in generate(), the routing drift metric, routing replay (R2).

    Composes with GSPOTrainer or TRL's plain GRPOTrainer (`class T(MoERoutingMixin, GRPOTrainer)`). Reads
    `args.log_routing_drift` (default True) and `args.routing_replay` (default False); a dense model passes through
    untouched. Overrides:
      __init__                           hooks the routers; refuses replay on a dense model
      _generate_and_score_completions    generation without router logits; arms the pi_old pass for recording;
                                         puts the record into the rollout batch under ROUTING_KEY
      _get_per_token_logps_and_entropies records the routing of the armed (pi_old) pass
      compute_loss                       observes (drift) or replays the recorded routing in the policy pass
      training_step                      drops the replay state after backward (checkpointing recomputes)
    """

    def __init__(self, *args, **kwargs):
        self._moe_hooks, self._moe_record_armed, self._moe_recorded = None, False, None
        super().__init__(*args, **kwargs)
        self._moe_setup_routing()

    @property
    def _routing_replay(self) -> bool:
        return getattr(self.args, "routing_replay", False)

    @property
    def _log_routing_drift_on(self) -> bool:
        return getattr(self.args, "log_routing_drift", True)

    def _moe_setup_routing(self):
        """Hook the routers when the drift metric or replay needs them; refuse replay on a dense model."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        routers = find_routers(unwrapped)
        if self._routing_replay and not routers:
            model_type = getattr(unwrapped.config, "model_type", type(unwrapped).__name__)
            raise ValueError(
                f"routing_replay=True needs a Mixture-of-Experts model with *TopKRouter modules (Qwen3-MoE, "
                f"Qwen2-MoE, Mixtral, OLMoE); this model ({type(unwrapped).__name__}, model_type={model_type!r}) "
                "has none. Set routing_replay=False."
            )
        # the switches of the composed mixins (a GRPOConfig has no such fields: a composed padding-free mixin is on)
        speed_options = [
            name
            for name, active in (
                ("padding_free", getattr(self, "_padding_free", False)),
                ("use_rollout_logprobs", getattr(self, "_use_rollout_logprobs", False)),
            )
            if active
        ]
        if routers and self._log_routing_drift_on and speed_options:  # routing_replay is refused by GSPOConfig
            logger.warning(
                f"moe/routing_drift is not logged with {speed_options}: the routing record needs an unpacked pi_old "
                "forward. Set log_routing_drift=False to silence this."
            )
        elif routers and (self._log_routing_drift_on or self._routing_replay):
            self._moe_hooks = RouterHooks(routers)

    def _generate_and_score_completions(self, inputs):
        """The rollout without router logits in generation (the config's output_router_logits crashes cached decoding
        on padded batches; the training forward asks for them itself), with the pi_old pass recorded."""
        if self._moe_hooks is not None:
            self._moe_hooks.clear()
            self._moe_record_armed = pi_old_pass_runs(self.args)
        try:
            with router_logits_off(self.accelerator.unwrap_model(self.model)):
                output = super()._generate_and_score_completions(inputs)
        finally:
            self._moe_record_armed = False
        recorded, self._moe_recorded = self._moe_recorded, None
        if recorded is not None:  # (B, L, layers, k): its first dimension is the batch, so it follows its rows
            output[ROUTING_KEY] = recorded
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """The log-prob pass; the armed one (the rollout's pi_old pass) records the routing.

        The pi_old pass is the first one on the policy model after generation (TRL runs it before the reference
        pass, which with PEFT uses the same model with adapters disabled); it is armed only when TRL runs it.
        """
        if not (self._moe_record_armed and model is self.model):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._moe_record_armed = False
        with self._moe_hooks.recording():
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._moe_recorded = self._moe_hooks.recorded(*input_ids.shape)
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The trainer's, with the policy pass observing (drift metric) or replaying the recorded routing."""
        routing = inputs.get(ROUTING_KEY) if self._moe_hooks is not None else None
        if routing is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._moe_hooks.start_policy_pass(routing, replay=self._routing_replay)
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._log_routing_drift_on:
            self._log_routing_drift(inputs, routing)
        if not torch.is_grad_enabled():  # evaluation: no backward follows, so no training_step to clear the state
            self._moe_hooks.clear()
        return loss

    def training_step(self, model, inputs, num_items_in_batch):
        """The trainer's; the replay state is dropped only here, after backward (checkpointing recomputes)."""
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            if self._moe_hooks is not None:
                self._moe_hooks.clear()

    def _log_routing_drift(self, inputs, routing):
        """Log how much the routing moved between the pi_old pass and this policy pass, on completion tokens.

          moe/routing_drift/token_layer       fraction of (completion token, MoE layer) pairs whose top-k expert
                                              set differs from the pi_old pass (the paper: ~10% per update)
          moe/routing_drift/token_any_layer   fraction of completion tokens that changed in at least one layer
        Both count the *natural* routing of the current router, also under routing_replay (what replay undid).
        """
        prompt_length = inputs["prompt_ids"].size(1)
        current = self._moe_hooks.observed(routing.size(0), routing.size(1))
        counts = routing_drift_counts(
            routing[:, prompt_length:], current[:, prompt_length:], inputs["completion_mask"]
        )
        mode = "train" if self.model.training else "eval"
        for name, value in drift_fractions(self.accelerator.reduce(counts, reduction="sum")).items():
            self._metrics[mode][name].append(value)
