"""Mixture-of-Experts routing: no router logits in generate(), the routing drift metric, routing replay (R2 and R3).

Pure functions (tested against naive references), one hook manager, `RouterHooks`, and the feature object
`MoERouting` that GSPOTrainer's core calls in each pass (`moe_routing` builds it from the config).

How it works (docs/MOE.md has the details and measurements). transformers' MoE models route each token in a
`*TopKRouter` module that returns (router_logits, top_k_weights, top_k_index); every experts implementation takes
its indices from there, so a forward hook on the routers sees, and can replace, the routing of the whole model.

- pi_old pass: the hooks record each router's top-k indices for every position of every row, kept in the
  micro-batch under `ROUTING_KEY` as (B, L, layers, k) whatever layout the model saw (padded or packed rows).
  `generate()` and the reference pass are not recorded.
- policy pass: the hooks observe the current routing (drift metric) and, with replay, the router's one `topk` call
  returns the recorded indices, with the values gathered from the very tensor it was ranking (`ForcedTopK`). The
  router computes its weights from them with its own code, so with unchanged parameters replay is bit-identical and
  the router still gets gradients. The replay state lives until backward has finished: gradient checkpointing
  re-runs the router during backward and must see the same experts.
- rollout routing replay (R3): generate() is recorded too, and every training pass replays those experts where
  generation routed a position (`MoERouting`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.utils import logging

from .metrics import ROLLOUT_ROUTING_MISMATCH_PREFIX, ROUTING_DRIFT_PREFIX
from .rollout_routing import (
    ROLLOUT_ROUTING_KEY,
    ROLLOUT_ROUTING_KNOWN_KEY,
    RolloutRouting,
    padded_length,
    records_from_generation,
    rollout_routing_rows,
)

logger = logging.get_logger(__name__)

# Batch key of the recorded pi_old routing (B, L, layers, k); its first dimension is the batch, so it travels
# through TRL's shuffle_sequence_dict / split_tensor_dict with the rows it belongs to.
ROUTING_KEY = "moe_routing"
ROUTER_CLASS_SUFFIX = "TopKRouter"

# Routers whose forward makes exactly one top-k selection over the experts and returns its indices, so that
# `ForcedTopK` replays them exactly; each is tested on a tiny model of its type (tests/trainer/test_moe.py,
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
    weights from them with its own code. With `known` (N,) bool, only those tokens are forced and the others keep
    the natural choice (rollout routing replay: positions the rollout did not route). Counts the selections and
    keeps the natural indices (drift metric) and the returned ones (the hooks' check).
    """

    def __init__(
        self, forced: torch.Tensor, top_k: int, num_experts: int, layer: int, known: torch.Tensor | None = None
    ):
        super().__init__()
        self.forced, self.top_k, self.num_experts, self.layer, self.known = forced, top_k, num_experts, layer, known
        self.calls = 0
        self.natural: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

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
                f"{self.forced.size(0)}; a replayed forward must route exactly the tokens of the recorded batch."
            )
        self.natural = func(*args, **kwargs).indices
        indices = self.forced.to(scores.device, torch.long).view(*scores.shape[:-1], self.top_k)
        if self.known is not None:
            indices = torch.where(self.known.to(scores.device).view(*scores.shape[:-1], 1), indices, self.natural)
        self.indices = indices
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


def drift_fractions(counts: torch.Tensor, prefix: str = ROUTING_DRIFT_PREFIX) -> dict[str, float]:
    """`routing_drift_counts` (summed) -> the logged metrics; empty when there was no token to count."""
    changed_pairs, pairs, changed_tokens, tokens = counts.tolist()
    if tokens == 0:
        return {}
    return {f"{prefix}/token_layer": changed_pairs / pairs, f"{prefix}/token_any_layer": changed_tokens / tokens}


class RouterHooks:
    """Hooks on every router of a model: record the routing, observe it, or replay a recorded one.

    Idle unless told otherwise, so generate() and the reference pass go through untouched. A routing is in model
    order, (N, layers, k) for the N tokens one forward routes (the rows of the batch the model sees, padded or packed,
    flattened: `PaddedLayout` / `PackedBatch` map it to and from the (B, L) layout). One state at a time:
      `recording(forced, known)`  a context; every router call appends its natural indices; with `forced`
                                   (N, layers, k) the pass replays it where `known` (N,) is True (everywhere if None)
      `recorded()`, `recorded_steps(batch)`  the record of the last `recording()`: of one forward, or of a generate()
      `start_policy_pass(forced, known)`  observe the current routing and, with `forced`, replay it; stays on (for
                                   gradient checkpointing's recomputation in backward) until `clear()`
      `observed()`                 the natural routing seen since `start_policy_pass`, (N, layers, k)
    Replaying needs routers of `REPLAY_ROUTER_CLASSES` (refused otherwise at construction, `moe_routing`).
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
        self._forced: torch.Tensor | None = None
        self._known: torch.Tensor | None = None
        self._forcing: list[ForcedTopK | None] = [None] * len(routers)
        for i, router in enumerate(routers):
            router.register_forward_pre_hook(self._pre_hook(i))
            # always_call: the forcing mode is left even when the router's forward raises
            router.register_forward_hook(self._hook(i), always_call=True)

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def clear(self) -> None:
        """Back to idle; drops any replay state (call once backward of the policy pass has finished)."""
        for layer in range(self.num_layers):
            self._stop_forcing(layer)
        self._mode = "idle"
        self._forced = self._known = None
        self._observed = [None] * len(self.routers)

    @contextlib.contextmanager
    def recording(self, forced: torch.Tensor | None = None, known: torch.Tensor | None = None):
        self.clear()
        self._chunks = [[] for _ in self.routers]
        self._forced, self._known, self._mode = forced, known, "record"
        try:
            yield
        finally:
            self._mode = "idle"
            self._forced = self._known = None

    def recorded(self) -> torch.Tensor:
        """The last recording as (N, layers, k), each router's calls concatenated in call order."""
        layers = [torch.cat(chunks).view(-1, self.top_k) for chunks in self._chunks]
        self._chunks = [[] for _ in self.routers]
        return torch.stack(layers, dim=1).to(self.dtype)

    def recorded_steps(self, batch_size: int) -> tuple[torch.Tensor, int]:
        """The last recording of a generate() call as (B, T, layers, k), chunks concatenated along the positions
        (each call routes every row: the prefill, then one position per decoding step), and the prefill's length."""
        prefill = self._chunks[0][0].size(0) // batch_size
        layers = [torch.cat([c.view(batch_size, -1, self.top_k) for c in chunks], dim=1) for chunks in self._chunks]
        self._chunks = [[] for _ in self.routers]
        return torch.stack(layers, dim=2).to(self.dtype), prefill

    def start_policy_pass(self, forced: torch.Tensor | None = None, known: torch.Tensor | None = None) -> None:
        self.clear()
        self._mode, self._forced, self._known = "policy", forced, known

    def observed(self) -> torch.Tensor:
        if any(o is None for o in self._observed):
            raise RuntimeError("RouterHooks.observed: not every router ran since start_policy_pass.")
        return torch.stack([o.view(-1, self.top_k) for o in self._observed], dim=1)

    def _stop_forcing(self, layer: int) -> ForcedTopK | None:
        forcing, self._forcing[layer] = self._forcing[layer], None
        if forcing is not None:
            forcing.__exit__(None, None, None)
        return forcing

    def _pre_hook(self, layer: int):
        def pre_hook(module, args):
            if self._mode == "idle" or self._forced is None:
                return
            # a replayed pass; gradient checkpointing runs this again in backward (policy pass), with the same result
            self._forcing[layer] = ForcedTopK(
                self._forced[:, layer], self.top_k, module.num_experts, layer, self._known
            )
            self._forcing[layer].__enter__()

        return pre_hook

    def _hook(self, layer: int):
        def hook(module, args, output):
            forcing = self._stop_forcing(layer)
            if self._mode == "idle" or output is None:
                return
            indices = output[2]
            if forcing is not None:
                if forcing.calls != 1 or not torch.equal(indices.reshape(forcing.indices.shape), forcing.indices):
                    raise RuntimeError(
                        f"routing replay: {type(module).__name__} (layer {layer}) made {forcing.calls} top-k "
                        "selections or did not return the replayed experts; it cannot be replayed exactly."
                    )
                indices = forcing.natural
            if self._mode == "record":
                self._chunks[layer].append(indices.detach())
            else:
                self._observed[layer] = indices.detach()

        return hook


def moe_routing(model, args, tools, rollout_func, pad_to_multiple_of) -> MoERouting | None:
    """The routing feature GSPOTrainer's configuration asks for, or None (a dense model, or nothing asked).

    Refuses replay on a model without hookable routers or with a router outside REPLAY_ROUTER_CLASSES, and R3 where
    the completions do not come from TRL's single generate() call (tools, a custom rollout_func); warns when the
    drift metric has nothing to compare with.
    """
    routers = find_routers(model)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    replay = "rollout" if args.rollout_routing_replay else "pi_old" if args.routing_replay else None
    field = {"rollout": "rollout_routing_replay", "pi_old": "routing_replay"}.get(replay)
    # routers of another shape (e.g. DeepSeek-V3's *TopkRouter returns only logits): no hook can see their experts
    unhookable = sorted(
        {type(m).__name__ for m in model.modules() if "router" in type(m).__name__.lower()}
        - {type(router).__name__ for router in routers}
    )
    if replay and not routers:
        found = f"routes with {', '.join(unhookable)}, which does not return its experts" if unhookable else "has none"
        raise ValueError(
            f"{field}=True needs a Mixture-of-Experts model with *TopKRouter modules (Qwen3-MoE, Qwen2-MoE, Mixtral, "
            f"OLMoE, ...); this model ({type(model).__name__}, model_type={model_type!r}) {found}. Set {field}=False."
        )
    drift = args.log_routing_drift
    if unhookable and not routers and drift:
        logger.warning(
            f"moe/routing_drift is not logged for this model ({type(model).__name__}): it routes with "
            f"{', '.join(unhookable)}, which does not return its experts (trl_gspo/moe.py hooks *TopKRouter modules). "
            "Set log_routing_drift=False to silence this."
        )
    unsupported = sorted({type(router).__name__ for router in routers} - REPLAY_ROUTER_CLASSES)
    if replay and unsupported:
        raise ValueError(
            f"{field}=True: this model ({type(model).__name__}, model_type={model_type!r}) routes with "
            f"{', '.join(unsupported)}, whose replay is not shown to be exact (see docs/MOE.md). Supported routers: "
            f"{', '.join(sorted(REPLAY_ROUTER_CLASSES))}. Set {field}=False."
        )
    if replay == "rollout":
        other_generation = [
            name for name, active in (("tools", bool(tools)), ("rollout_func", rollout_func)) if active
        ]
        if other_generation:
            raise ValueError(
                "rollout_routing_replay=True records the routing of TRL's single generate() call per rollout; with "
                f"{other_generation} the completions are produced otherwise (tool turns, a custom rollout), so their "
                "routing is not recorded. Set rollout_routing_replay=False."
            )
    if routers and drift and args.use_rollout_logprobs and replay != "rollout":
        logger.warning(
            "moe/routing_drift is not logged with use_rollout_logprobs=True: pi_old is the sampler's, whose routing "
            "is recorded only with rollout_routing_replay=True. Set log_routing_drift=False to silence this."
        )
        drift = False
    if not routers or not (drift or replay):
        return None
    return MoERouting(RouterHooks(routers), replay, drift, pad_to_multiple_of)


class MoERouting:
    """The MoE routing feature of a trainer: what each pass records, replays and logs (`moe_routing` builds it).

    `replay`: None, "pi_old" (R2: the policy pass replays the pi_old pass's routing) or "rollout" (R3: generation is
    recorded, and every training pass replays the rollout's experts where generation routed a position, `known`;
    the other positions, the last completion token and padding, feed no scored log-prob and route themselves; so R3
    needs no pi_old pass and composes with rollout log-probs as pi_old and with packed passes).
    `drift`: log moe/routing_drift, the policy pass's natural routing against pi_old's: the pi_old pass's record, or,
    with rollout log-probs as pi_old, the rollout's routing.
    Each pass hands a context factory `around_forward(layout)` to the forward backend, which calls it around the
    model call with the layout (padded or packed) the model sees, so the record stays in the (B, L) layout of the
    batch whatever the backend.
    """

    def __init__(self, hooks: RouterHooks, replay: str | None, drift: bool, pad_to_multiple_of: int | None):
        self.hooks, self.replay, self.drift, self.pad_to_multiple_of = hooks, replay, drift, pad_to_multiple_of
        self._rollout_records: list[RolloutRouting] | None = None
        self._policy_layout = None

    def recording_generation(self):
        """Context around one transformers generate() of a rollout: with R3 its routing is recorded (prefill and
        cached decoding); `generated` then cuts it into rows."""
        return self.hooks.recording() if self.replay == "rollout" else contextlib.nullcontext()

    def generated(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> None:
        """R3: the recorded routing of the generate() call that produced `completion_ids`, one RolloutRouting per
        row, kept for `attach_rollout_routing`."""
        if self.replay != "rollout":
            return
        routing, prefill = self.hooks.recorded_steps(len(prompt_ids))
        padded = padded_length(max(len(ids) for ids in prompt_ids), self.pad_to_multiple_of)
        # generation stops with its longest completion (TRL cuts the others at their first EOS)
        expected = padded + max(len(ids) for ids in completion_ids) - 1
        if prefill != padded or routing.size(1) != expected:
            raise RuntimeError(
                f"rollout_routing_replay: generate() routed {prefill} positions per row in its first forward and "
                f"{routing.size(1)} in all; a prefill of the {padded} left-padded prompt positions, then one position "
                f"per decoding step ({expected} in all) was expected. Generation with a chunked prefill, beam search "
                "or assisted decoding cannot be recorded: remove those generation settings or set "
                "rollout_routing_replay=False."
            )
        self._rollout_records = records_from_generation(
            routing, [len(ids) for ids in prompt_ids], [len(ids) for ids in completion_ids], padded
        )

    def attach_rollout_routing(self, output: dict) -> None:
        """R3: the rollout's routing laid out as the rollout batch's rows (both tensors have the batch first, so
        TRL's shuffle and split carry them with their rows)."""
        records, self._rollout_records = self._rollout_records, None
        if records is not None:
            output[ROLLOUT_ROUTING_KEY], output[ROLLOUT_ROUTING_KNOWN_KEY] = rollout_routing_rows(
                records, output["prompt_ids"].size(1), output["completion_ids"].size(1)
            )

    def pi_old_pass(self, batch: dict, log, keep_record: bool = True):
        """`around_forward` of the pi_old pass of micro-batch `batch`: with R3 it replays the rollout's experts; it
        records the natural routing into batch[ROUTING_KEY] (`keep_record`), and with R3 logs how it differs from
        the rollout's (`log(counts, prefix)`)."""
        rollout, known = batch.get(ROLLOUT_ROUTING_KEY), batch.get(ROLLOUT_ROUTING_KNOWN_KEY)

        @contextlib.contextmanager
        def around_forward(layout):
            forced = None if rollout is None else layout.to_model_order(rollout)
            with self.hooks.recording(forced, None if known is None else layout.to_model_order(known)):
                yield
            natural = layout.from_model_order(self.hooks.recorded())
            if keep_record:
                batch[ROUTING_KEY] = natural
            if rollout is not None:
                prompt_width = batch["prompt_ids"].size(1)
                mask = batch["completion_mask"].bool() & known[:, prompt_width:]
                log(
                    routing_drift_counts(rollout[:, prompt_width:], natural[:, prompt_width:], mask),
                    ROLLOUT_ROUTING_MISMATCH_PREFIX,
                )

        return around_forward

    def policy_pass(self, batch: dict):
        """`around_forward` of the policy pass of `batch`: observe the routing and replay (R2: the pi_old pass's, R3:
        the rollout's where known). The state stays until `clear()` (backward may recompute)."""
        forced = known = None
        if self.replay == "pi_old":
            forced = batch[ROUTING_KEY]
        elif self.replay == "rollout":
            forced, known = batch[ROLLOUT_ROUTING_KEY], batch[ROLLOUT_ROUTING_KNOWN_KEY]

        @contextlib.contextmanager
        def around_forward(layout):
            self._policy_layout = layout
            self.hooks.start_policy_pass(
                None if forced is None else layout.to_model_order(forced),
                None if known is None else layout.to_model_order(known),
            )
            yield

        return around_forward

    def log_drift(self, batch: dict, log) -> None:
        """After the policy pass of `batch`: moe/routing_drift (trl_gspo/metrics.py), its natural routing on the
        completion tokens against pi_old's (the pi_old pass's record, else the rollout's where generation routed);
        nothing without either. It counts the natural routing of the current router, also under replay."""
        prompt_width = batch["prompt_ids"].size(1)
        mask = batch["completion_mask"].bool()
        reference = batch.get(ROUTING_KEY)
        if reference is None and ROLLOUT_ROUTING_KEY in batch:
            reference = batch[ROLLOUT_ROUTING_KEY]
            mask = mask & batch[ROLLOUT_ROUTING_KNOWN_KEY][:, prompt_width:]
        if not self.drift or reference is None:
            return
        current = self._policy_layout.from_model_order(self.hooks.observed())
        log(routing_drift_counts(reference[:, prompt_width:], current[:, prompt_width:], mask), ROUTING_DRIFT_PREFIX)

    def clear(self) -> None:
        self.hooks.clear()
        self._policy_layout = None
