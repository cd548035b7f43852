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
- policy pass (in `compute_loss`): the hooks observe the current routing (drift metric) and, with replay, make
  the router's own forward pick the recorded experts: during the router's forward its one `topk` call returns
  the recorded indices, with the values gathered from the very tensor it was ranking (`ForcedTopK`). Whatever the
  router computes from them (softmax or sigmoid, score bias, renormalisation, scaling) is its own code, so with
  unchanged parameters replay is bit-identical and the router still gets gradients. Only the router classes in
  `REPLAY_ROUTER_CLASSES` (each tested on a tiny model) are accepted. The replay state lives until backward has
  finished: gradient checkpointing re-runs the router during backward and must see the same experts.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# Batch key of the recorded pi_old routing (B, L, layers, k); its first dimension is the batch, so it travels
# through TRL's shuffle_sequence_dict / split_tensor_dict with the rows it belongs to.
ROUTING_KEY = "moe_routing"
ROUTER_CLASS_SUFFIX = "TopKRouter"

# Routers whose forward makes exactly one top-k selection over the experts and returns its indices, so that
# `ForcedTopK` replays them exactly; each is tested on a tiny model of its type (tests/test_moe.py,
# REPLAY_MODELS), and docs/MOE.md lists why the other `*TopKRouter` classes of transformers 5.24 are not here.
REPLAY_ROUTER_CLASSES = frozenset(
    {
        "Cohere2MoeTopKRouter",
        "DeepseekV4TopKRouter",
        "Ernie4_5_MoeTopKRouter",
        "FlexOlmoTopKRouter",
        "FlintTopKRouter",
        "GptOssTopKRouter",
        "GraniteMoeHybridTopKRouter",
        "GraniteMoeSWATopKRouter",
        "GraniteMoeSharedTopKRouter",
        "GraniteMoeTopKRouter",
        "HYV3TopKRouter",
        "JambaTopKRouter",
        "LagunaTopKRouter",
        "LaraMiniTopKRouter",
        "Lfm2MoeTopKRouter",
        "MellumTopKRouter",
        "MiniMaxM2TopKRouter",
        "MiniMaxTopKRouter",
        "MixtralTopKRouter",
        "OlmoeTopKRouter",
        "Qwen2MoeTopKRouter",
        "Qwen3MoeTopKRouter",
        "Qwen3NextTopKRouter",
        "Qwen3_5MoeTopKRouter",
    }
)


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


def _topk_arguments(input, k, dim=-1, largest=True, sorted=True):
    return input, k, dim


class ForcedTopK(TorchFunctionMode):
    """Active during one router forward: its top-k selection returns the `forced` (N, k) expert indices.

    The values are gathered from the tensor the router ranks, so they are what `topk` itself returns for those
    experts (bit for bit when they are the natural choice) and carry its gradient; the router computes its
    weights from them with its own code. Counts the selections and keeps the natural indices (drift metric).
    """

    def __init__(self, forced: torch.Tensor, top_k: int, num_experts: int, layer: int):
        super().__init__()
        self.forced, self.top_k, self.num_experts, self.layer = forced, top_k, num_experts, layer
        self.calls = 0
        self.natural: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (torch.topk, torch.Tensor.topk):
            return func(*args, **kwargs)
        scores, k, dim = _topk_arguments(*args, **kwargs)
        self.calls += 1
        if k != self.top_k or dim not in (-1, scores.dim() - 1) or scores.size(-1) != self.num_experts:
            raise RuntimeError(
                f"routing replay: layer {self.layer}'s router calls topk(k={k}, dim={dim}) on a tensor of shape "
                f"{tuple(scores.shape)}; only a single top-{self.top_k} selection over the last dimension, of "
                f"{self.num_experts} experts, can be replayed."
            )
        tokens = scores.shape[:-1].numel()
        if self.forced.size(0) != tokens:
            raise RuntimeError(
                f"routing replay: layer {self.layer} routes {tokens} tokens but the recorded routing holds "
                f"{self.forced.size(0)} (rows x length of the rollout batch); the policy forward must see the same "
                "padded rows as the pi_old pass."
            )
        self.natural = func(*args, **kwargs).indices
        indices = self.forced.to(scores.device, torch.long).view(*scores.shape[:-1], self.top_k)
        return torch.return_types.topk((scores.gather(-1, indices), indices))


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
    """Hooks on every router of a model: record the routing, observe it, or replay a recorded one.

    Idle unless told otherwise, so generate() and reference passes go through untouched. One state at a time:
      `recording()`                a context; every router call appends its indices (any number of chunks)
      `recorded(batch, length)`    the record of the last `recording()` as (B, L, layers, k)
      `start_policy_pass(routing, replay)`  observe the current routing and, with replay, force `routing`
                                    (B, L, layers, k); stays on (for backward recomputation) until `clear()`
      `observed(batch, length)`    the current (natural) routing seen in the policy pass, (B, L, layers, k)
    Replaying needs routers of `REPLAY_ROUTER_CLASSES` (the trainer refuses others at construction).
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
        self._forcing: list[ForcedTopK | None] = [None] * len(routers)
        self._handles = []
        for i, router in enumerate(routers):
            self._handles.append(router.register_forward_pre_hook(self._pre_hook(i)))
            # always_call: the forcing mode is left even when the router's forward raises
            self._handles.append(router.register_forward_hook(self._hook(i), always_call=True))

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def clear(self) -> None:
        """Back to idle; drops any replay state (call once backward of the policy pass has finished)."""
        for layer in range(self.num_layers):
            self._stop_forcing(layer)
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

    def _stop_forcing(self, layer: int) -> ForcedTopK | None:
        forcing, self._forcing[layer] = self._forcing[layer], None
        if forcing is not None:
            forcing.__exit__(None, None, None)
        return forcing

    def _pre_hook(self, layer: int):
        def pre_hook(module, args):
            if self._mode != "policy" or self._replay is None:
                return
            # policy pass with replay; gradient checkpointing runs this again in backward, with the same result
            forced = self._replay[:, :, layer].reshape(-1, self.top_k)
            self._forcing[layer] = ForcedTopK(forced, self.top_k, module.num_experts, layer)
            self._forcing[layer].__enter__()

        return pre_hook

    def _hook(self, layer: int):
        def hook(module, args, output):
            forcing = self._stop_forcing(layer)
            if self._mode == "idle" or output is None:
                return
            indices = output[2]
            if self._mode == "record":
                self._chunks[layer].append(indices.detach())
            elif forcing is None:  # policy pass, observing only
                self._observed[layer] = indices.detach()
            else:
                if forcing.calls != 1 or not torch.equal(
                    indices.reshape(forcing.forced.shape), forcing.forced.to(indices)
                ):
                    raise RuntimeError(
                        f"routing replay: {type(module).__name__} (layer {layer}) made {forcing.calls} top-k "
                        "selections or did not return the replayed experts; it cannot be replayed exactly."
                    )
                self._observed[layer] = forcing.natural.detach()

        return hook
