"""Mixture-of-Experts routing: no router logits in generate(), the routing drift metric, routing replay (R2 and R3).

Pure functions (tested against naive references), one hook manager, `RouterHooks`, and the trainer mixin
`MoERoutingMixin` that wires them into GSPOTrainer's rollout and loss.

How it works. transformers' MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) route each token in a `*TopKRouter`
module that returns (router_logits, top_k_weights, top_k_index); every experts implementation takes its
indices from there, so a forward hook on the routers sees, and can replace, the routing of the whole model.

- pi_old pass (inside `_generate_and_score_completions`, once per rollout): the hooks record each router's
  top-k indices for every position of every row (prompt and completion), shape (B, L, layers, k). The tensor
  rides in the rollout batch under `ROUTING_KEY`, so TRL's shuffle and split carry it with its rows. With
  `AlignedPiOldMixin` (GSPOTrainer) a train rollout's pi_old pass runs per micro-batch after the split instead,
  and each micro-batch's record is put into that micro-batch.
  `generate()` and the reference pass are not recorded.
- policy pass (in `compute_loss`): the hooks observe the current routing (drift metric) and, with replay, make
  the router's own forward pick the recorded experts: during the router's forward its one `topk` call returns
  the recorded indices, with the values gathered from the very tensor it was ranking (`ForcedTopK`). Whatever the
  router computes from them (softmax or sigmoid, score bias, renormalisation, scaling) is its own code, so with
  unchanged parameters replay is bit-identical and the router still gets gradients. Only the router classes in
  `REPLAY_ROUTER_CLASSES` (each tested on a tiny model) are accepted. The replay state lives until backward has
  finished: gradient checkpointing re-runs the router during backward and must see the same experts.
- rollout routing replay (R3, `rollout_routing_replay`): generate() is recorded too (prefill and cached decoding),
  one `rollout_routing.RolloutRouting` per row, laid out as TRL's rows under ROLLOUT_ROUTING_KEY with a mask of the
  positions generation routed; the pi_old pass replays those experts (the router chooses the other positions) and
  records its natural routing; the policy pass replays what the pi_old pass used.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.utils import logging

from .config import pi_old_pass_runs
from .metrics import ROLLOUT_ROUTING_MISMATCH_PREFIX, ROUTING_DRIFT_PREFIX
from .rollout_routing import (
    ROLLOUT_ROUTING_KEY,
    ROLLOUT_ROUTING_KNOWN_KEY,
    RolloutRouting,
    padded_length,
    records_from_generation,
    rollout_routing_rows,
)
from .trl_api import check_trl_private_api, check_trl_private_attributes

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
                f"{self.forced.size(0)} (rows x length of the rollout batch); the policy forward must see the same "
                "padded rows as the pi_old pass."
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

    Idle unless told otherwise, so generate() and reference passes go through untouched. One state at a time:
      `recording(routing, known)`  a context; every router call appends its natural indices (any number of
                                    chunks); with `routing` (B, L, layers, k) the pass replays it, where `known`
                                    (B, L) is True, row chunks taken in call order (R3's pi_old pass)
      `recorded(batch, length)`    the record of the last `recording()` as (B, L, layers, k), chunks of rows
      `recorded_steps(batch)`      the same for a generate() call: chunks of positions (prefill, then decoding)
      `start_policy_pass(routing, replay, known)`  observe the current routing and, with replay, force `routing`
                                    (B, L, layers, k) (only where `known`, if given); stays on (for backward
                                    recomputation) until `clear()`
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
        self._known: torch.Tensor | None = None
        self._cursor = [0] * len(routers)  # tokens of the replayed routing consumed by a recorded pass, per layer
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
        self._replay = self._known = None
        self._observed = [None] * len(self.routers)

    @contextlib.contextmanager
    def recording(self, routing: torch.Tensor | None = None, known: torch.Tensor | None = None):
        self.clear()
        self._chunks = [[] for _ in self.routers]
        self._replay, self._known, self._cursor = routing, known, [0] * self.num_layers
        self._mode = "record"
        try:
            yield
        finally:
            self._mode = "idle"

    def recorded(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """The last recording as (B, L, layers, k), chunks concatenated in call order (TRL chunks along rows)."""
        if self._replay is not None and self._cursor != [self._replay.shape[:2].numel()] * self.num_layers:
            raise RuntimeError(
                f"routing replay: the recorded pass routed {self._cursor} tokens per layer, not the "
                f"{self._replay.shape[:2].numel()} of the replayed routing {tuple(self._replay.shape)}."
            )
        layers = [torch.cat(chunks).view(batch_size, seq_len, self.top_k) for chunks in self._chunks]
        self._chunks = [[] for _ in self.routers]
        return torch.stack(layers, dim=2).to(self.dtype)

    def recorded_steps(self, batch_size: int) -> tuple[torch.Tensor, int]:
        """The last recording of a generate() call as (B, T, layers, k), chunks concatenated along the positions
        (each call routes every row: the prefill, then one position per decoding step), and the prefill's length."""
        prefill = self._chunks[0][0].size(0) // batch_size
        layers = [torch.cat([c.view(batch_size, -1, self.top_k) for c in chunks], dim=1) for chunks in self._chunks]
        self._chunks = [[] for _ in self.routers]
        return torch.stack(layers, dim=2).to(self.dtype), prefill

    def start_policy_pass(self, routing: torch.Tensor, replay: bool, known: torch.Tensor | None = None) -> None:
        self.clear()
        self._mode = "policy"
        self._replay = routing if replay else None
        self._known = known if replay else None

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
            if self._mode == "idle" or self._replay is None:
                return
            # a replayed pass; gradient checkpointing runs this again in backward (policy pass), with the same result
            forced = self._replay[:, :, layer].reshape(-1, self.top_k)
            known = None if self._known is None else self._known.reshape(-1)
            if self._mode == "record":  # a pass in chunks of rows (TRL's pi_old pass): this call routes the next rows
                start = self._cursor[layer]
                end = self._cursor[layer] = start + args[0].shape[:-1].numel()
                forced, known = forced[start:end], None if known is None else known[start:end]
            self._forcing[layer] = ForcedTopK(forced, self.top_k, module.num_experts, layer, known)
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


class MoERoutingMixin:
    """Trainer mixin for MoE models: no router logits in generate(), the routing drift metric, routing replay (R2),
    rollout routing replay (R3).

    Reads `args.log_routing_drift`, `args.routing_replay` and `args.rollout_routing_replay`; a dense model passes
    through untouched. Overrides:
      __init__                           hooks the routers; refuses replay on a dense model or an untested router
      _generate_single_turn              with R3: records generate()'s routing, one RolloutRouting per row
      _generate_and_score_completions    generation without router logits; arms the pi_old pass for recording;
                                         puts the record into the rollout batch under ROUTING_KEY (and the rollout
                                         routing under ROLLOUT_ROUTING_KEY / ROLLOUT_ROUTING_KNOWN_KEY)
      _get_per_token_logps_and_entropies records the routing of the armed (pi_old) pass (with R3: replaying the
                                         rollout's)
      _aligned_pi_old_pass               with AlignedPiOldMixin (inside this one): records each micro-batch's pass
      compute_loss                       observes (drift) or replays the recorded routing in the policy pass
      training_step                      drops the replay state after backward (checkpointing recomputes)

    R3: the pi_old pass replays the rollout's experts where the rollout routed a position (prompt and completion up
    to the last token; `known`) and routes the others itself; it records its natural routing. The policy pass then
    replays exactly what the pi_old pass used: the rollout's experts where known, the pi_old pass's elsewhere.
    """

    def __init__(self, *args, **kwargs):
        check_trl_private_api()
        self._moe_hooks, self._moe_record_armed, self._moe_recorded = None, False, None
        self._moe_rollout_records: list[RolloutRouting] | None = None  # R3: the rollout being generated
        self._moe_rollout_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # its rows, once laid out
        super().__init__(*args, **kwargs)
        check_trl_private_attributes(self)
        self._moe_setup_routing()

    @property
    def _rollout_routing_replay(self) -> bool:
        return self.args.rollout_routing_replay

    @property
    def _routing_replay(self) -> bool:
        """Whether the policy pass replays: R2, or R3 (whose policy pass replays what its pi_old pass used)."""
        return self.args.routing_replay or self._rollout_routing_replay

    @property
    def _replay_field(self) -> str:
        return "rollout_routing_replay" if self._rollout_routing_replay else "routing_replay"

    @property
    def _log_routing_drift_on(self) -> bool:
        return self.args.log_routing_drift

    def _moe_setup_routing(self):
        """Hook the routers when the drift metric or replay needs them; refuse replay on a dense model."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        routers = find_routers(unwrapped)
        model_type = getattr(unwrapped.config, "model_type", type(unwrapped).__name__)
        field = self._replay_field
        # routers of another shape (e.g. DeepSeek-V3's *TopkRouter returns only logits): no hook can see their experts
        unhookable = sorted(
            {type(m).__name__ for m in unwrapped.modules() if "router" in type(m).__name__.lower()}
            - {type(router).__name__ for router in routers}
        )
        if self._routing_replay and not routers:
            found = (
                f"routes with {', '.join(unhookable)}, which does not return its experts" if unhookable else "has none"
            )
            raise ValueError(
                f"{field}=True needs a Mixture-of-Experts model with *TopKRouter modules (Qwen3-MoE, "
                f"Qwen2-MoE, Mixtral, OLMoE, ...); this model ({type(unwrapped).__name__}, model_type={model_type!r}) "
                f"{found}. Set {field}=False."
            )
        if unhookable and not routers and self._log_routing_drift_on:
            logger.warning(
                f"moe/routing_drift is not logged for this model ({type(unwrapped).__name__}): it routes with "
                f"{', '.join(unhookable)}, which does not return its experts (trl_gspo/moe.py hooks *TopKRouter "
                "modules). Set log_routing_drift=False to silence this."
            )
        unsupported = sorted({type(router).__name__ for router in routers} - REPLAY_ROUTER_CLASSES)
        if self._routing_replay and unsupported:
            raise ValueError(
                f"{field}=True: this model ({type(unwrapped).__name__}, model_type={model_type!r}) routes with "
                f"{', '.join(unsupported)}, whose replay is not shown to be exact (see docs/MOE.md). Supported "
                f"routers: {', '.join(sorted(REPLAY_ROUTER_CLASSES))}. Set {field}=False."
            )
        if self._rollout_routing_replay:
            # generation is recorded in _generate_single_turn, once per rollout, from one left-padded generate() call
            other_generation = [
                name
                for name, active in (("tools", bool(self.tools)), ("rollout_func", self.rollout_func is not None))
                if active
            ]
            if other_generation:
                raise ValueError(
                    f"rollout_routing_replay=True records the routing of TRL's single generate() call per rollout; "
                    f"with {other_generation} the completions are produced otherwise (tool turns, a custom "
                    "rollout), so their routing is not recorded. Set rollout_routing_replay=False."
                )
        speed_options = [name for name in ("padding_free", "use_rollout_logprobs") if getattr(self.args, name)]
        if routers and self._log_routing_drift_on and speed_options:  # routing_replay is refused by GSPOConfig
            logger.warning(
                f"moe/routing_drift is not logged with {speed_options}: the routing record needs an unpacked pi_old "
                "forward. Set log_routing_drift=False to silence this."
            )
        elif routers and (self._log_routing_drift_on or self._routing_replay):
            self._moe_hooks = RouterHooks(routers)

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        """TRL's generation; with R3 its routing is recorded (prefill and cached decoding) and cut into one
        RolloutRouting per row, for the pi_old pass to replay."""
        if not self._rollout_routing_replay:
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        with self._moe_hooks.recording():
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        routing, prefill = self._moe_hooks.recorded_steps(len(prompt_ids))
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
        self._moe_rollout_records = records_from_generation(
            routing, [len(ids) for ids in prompt_ids], [len(ids) for ids in completion_ids], padded
        )
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        """The rollout without router logits in generation (the config's output_router_logits crashes cached decoding
        on padded batches; the training forward asks for them itself), with the pi_old pass recorded."""
        if self._moe_hooks is not None:
            self._moe_hooks.clear()
            # with AlignedPiOldMixin the pi_old of a train rollout is computed per micro-batch after the split and
            # recorded there (`_aligned_pi_old_pass`); TRL's pass is then skipped or not the one the loss uses
            per_micro_batch = getattr(self, "_pi_old_per_micro_batch", None)
            aligned = per_micro_batch is not None and per_micro_batch()
            self._moe_record_armed = pi_old_pass_runs(self.args) and not aligned
        try:
            with router_logits_off(self.accelerator.unwrap_model(self.model)):
                output = super()._generate_and_score_completions(inputs)
        finally:
            self._moe_record_armed = False
            records, self._moe_rollout_records = self._moe_rollout_records, None
            rows, self._moe_rollout_rows = self._moe_rollout_rows, None
        recorded, self._moe_recorded = self._moe_recorded, None
        if recorded is not None:  # (B, L, layers, k): its first dimension is the batch, so it follows its rows
            output[ROUTING_KEY] = recorded
        if records is not None:  # R3; (B, L, layers, k) and (B, L): they follow their rows too
            if rows is None:  # TRL's pi_old pass did not lay them out (the aligned pass replays them per micro-batch)
                rows = rollout_routing_rows(records, output["prompt_ids"].size(1), output["completion_ids"].size(1))
            output[ROLLOUT_ROUTING_KEY], output[ROLLOUT_ROUTING_KNOWN_KEY] = rows
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """The log-prob pass; the armed one (the rollout's pi_old pass) records the routing (with R3, replaying the
        rollout's).

        The pi_old pass is the first one on the policy model after generation (TRL runs it before the reference
        pass, which with PEFT uses the same model with adapters disabled); it is armed only when TRL runs it.
        """
        if not (self._moe_record_armed and model is self.model):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._moe_record_armed = False
        prompt_width = input_ids.size(1) - logits_to_keep
        if self._moe_rollout_records is not None:
            self._moe_rollout_rows = rollout_routing_rows(self._moe_rollout_records, prompt_width, logits_to_keep)
        rollout, known = self._moe_rollout_rows or (None, None)
        with self._moe_hooks.recording(rollout, known):
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._moe_recorded = self._moe_hooks.recorded(*input_ids.shape)
        if rollout is not None:
            self._log_rollout_routing_mismatch(rollout, known, self._moe_recorded, attention_mask, prompt_width)
        return result

    def _aligned_pi_old_pass(self, batch):
        """AlignedPiOldMixin's pi_old pass of one micro-batch, recorded: the routing goes into that micro-batch under
        ROUTING_KEY, so the policy pass replays (or measures drift against) the routing of the very same rows. With
        R3 the pass replays the micro-batch's rollout routing."""
        if self._moe_hooks is None:
            return super()._aligned_pi_old_pass(batch)
        rollout, known = batch.get(ROLLOUT_ROUTING_KEY), batch.get(ROLLOUT_ROUTING_KNOWN_KEY)
        with self._moe_hooks.recording(rollout, known):
            logps = super()._aligned_pi_old_pass(batch)
        prompt_width = batch["prompt_ids"].size(1)
        batch[ROUTING_KEY] = self._moe_hooks.recorded(
            batch["prompt_ids"].size(0), prompt_width + batch["completion_ids"].size(1)
        )
        if rollout is not None:
            attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            self._log_rollout_routing_mismatch(rollout, known, batch[ROUTING_KEY], attention_mask, prompt_width)
        return logps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The trainer's, with the policy pass observing (drift metric) or replaying the recorded routing."""
        routing = inputs.get(ROUTING_KEY) if self._moe_hooks is not None else None
        if routing is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        rollout = inputs.get(ROLLOUT_ROUTING_KEY)
        if rollout is None:
            self._moe_hooks.start_policy_pass(routing, replay=self._routing_replay)
        else:  # R3: what the pi_old pass used, the rollout's experts where it routed, the pass's own elsewhere
            known = inputs[ROLLOUT_ROUTING_KNOWN_KEY][:, :, None, None]
            self._moe_hooks.start_policy_pass(torch.where(known, rollout, routing), replay=True)
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

    def _log_moe_counts(self, counts: torch.Tensor, prefix: str):
        mode = "train" if self.model.training else "eval"
        for name, value in drift_fractions(self.accelerator.reduce(counts, reduction="sum"), prefix).items():
            self._metrics[mode][name].append(value)

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
        self._log_moe_counts(counts, ROUTING_DRIFT_PREFIX)

    def _log_rollout_routing_mismatch(self, rollout, known, natural, attention_mask, prompt_width):
        """R3: how the trainer's own routing (pi_old pass, natural) differs from the rollout's, on the completion
        tokens the rollout routed (all but the last of each completion).

          moe/rollout_routing_mismatch/token_layer      fraction of (token, MoE layer) pairs whose top-k set differs
          moe/rollout_routing_mismatch/token_any_layer  fraction of tokens that differ in at least one layer
        """
        mask = attention_mask[:, prompt_width:].bool() & known[:, prompt_width:]
        counts = routing_drift_counts(rollout[:, prompt_width:], natural[:, prompt_width:], mask)
        self._log_moe_counts(counts, ROLLOUT_ROUTING_MISMATCH_PREFIX)
