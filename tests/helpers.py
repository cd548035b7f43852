"""Naive references and model builders shared by tests of several layers (unit, trainer).

- `reference_objective`, `reference_clip_flags`: the GSPO objective and what its clip statistics should count, as
  float64 loops over sequences and tokens, straight from the paper's formulas.
- `ragged_batch`, `tiny_model`: a batch laid out as GRPOTrainer lays it out, and tiny random models of every model
  type the padding-free allowlist or refusal list names.
"""

import contextlib
import inspect
import math
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer import add_fused_lm_head

from gspo_benchmarks.packing_sweep import ragged_batch  # noqa: F401 - the tests' padded batch builder
from trl_gspo.moe import find_routers
from trl_gspo.objective import DEFAULT_LOG_RATIO_BOUND


# ---------------------------------------------------------------------------------------------------------------
# Reference: one Python loop per sequence and token, float64, straight from arXiv 2507.18071 (eqs. 5-7, 10-11).
# ---------------------------------------------------------------------------------------------------------------
def reference_objective(
    level,
    logp,
    old,
    adv,
    mask,
    eps_low,
    eps_high,
    seq_weights=None,
    tok_weights=None,
    ref=None,
    beta=0.0,
    kl_correction=True,
    bound=DEFAULT_LOG_RATIO_BOUND,
):
    """Loss = -(1/B) sum_i [ J_i ] + beta * (1/B) sum_i mean_t KL_it, computed element by element in float64."""
    B, T = logp.shape
    total = logp.new_zeros((), dtype=torch.float64)
    for i in range(B):
        tokens = [t for t in range(T) if mask[i, t] > 0]
        n = len(tokens)
        if n == 0:
            continue
        log_s = sum(logp[i, t] - old[i, t] for t in tokens) / n
        log_s = torch.clamp(log_s, -bound, bound)
        if level == "sequence":
            s = torch.exp(log_s)
            a = adv[i]
            term = torch.minimum(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a)
        else:
            term = 0.0
            for t in tokens:
                # s_it = sg[s_i] * pi_it / sg[pi_it]
                s_t = torch.exp(log_s.detach()) * torch.exp(logp[i, t]) / torch.exp(logp[i, t].detach())
                if abs(log_s.item()) >= bound:
                    s_t = s_t.detach()
                a = adv[i, t] if adv.dim() == 2 else adv[i]
                w = 1.0 if tok_weights is None else tok_weights[i, t]
                term = term + w * torch.minimum(s_t * a, torch.clamp(s_t, 1 - eps_low, 1 + eps_high) * a)
            term = term / n
        if seq_weights is not None:
            term = term * seq_weights[i]
        total = total - term
        if beta:
            kl = 0.0
            for t in tokens:
                d = ref[i, t] - logp[i, t]
                k = torch.exp(d) - d - 1
                if kl_correction:
                    k = k * torch.exp(torch.clamp(logp[i, t] - old[i, t], -bound, bound))
                kl = kl + k
            total = total + beta * kl / n
    return total / B


def reference_clip_flags(level, logp, old, adv, mask, eps_low, eps_high, seq_weights=None, tok_weights=None):
    """What the clip statistics should count, read off the float64 reference's gradient, one sequence at a time.

    Counted: the sequences (GSPO) or tokens (GSPO-token) in the loss: unmasked, with non-zero weights. Clipped: a
    counted one whose advantage is non-zero yet whose own reference term gives its log-probs no gradient (the clip
    or the log-ratio clamp cut it off); low when log s_i < 0, high otherwise.
    Returns (counted, low, high): lists of bools per sequence (GSPO), lists of lists per token (GSPO-token).
    """
    counted, low, high = [], [], []
    for i in range(logp.size(0)):
        tokens = [t for t in range(logp.size(1)) if mask[i, t] > 0]
        x = logp[i : i + 1].detach().clone().requires_grad_(True)
        term = reference_objective(level, x, old[i : i + 1], adv[i : i + 1], mask[i : i + 1], eps_low, eps_high)
        if torch.is_tensor(term) and term.requires_grad:  # not so for an empty row, or GSPO-token at the bound
            term.backward()
        no_gradient = [x.grad is None or x.grad[0, t].item() == 0.0 for t in range(logp.size(1))]
        log_s = math.fsum((logp[i, t] - old[i, t]).item() for t in tokens) / max(len(tokens), 1)
        row_in_loss = bool(tokens) and (seq_weights is None or bool(seq_weights[i] != 0))
        if level == "sequence":
            clipped = row_in_loss and bool(adv[i] != 0) and all(no_gradient[t] for t in tokens)
            counted.append(row_in_loss)
            low.append(clipped and log_s < 0)
            high.append(clipped and log_s > 0)
            continue
        row = [
            row_in_loss and bool(mask[i, t] > 0) and (tok_weights is None or bool(tok_weights[i, t] != 0))
            for t in range(x.size(1))
        ]
        token_adv = adv[i] if adv.dim() == 2 else adv[i].expand(x.size(1))
        clipped = [row[t] and bool(token_adv[t] != 0) and no_gradient[t] for t in range(x.size(1))]
        counted.append(row)
        low.append([c and log_s < 0 for c in clipped])
        high.append([c and log_s > 0 for c in clipped])
    return counted, low, high


# --- tiny models and batches (padding-free tests) ---


TINY_SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # weights 5x larger than transformers' default: with 0.02 the state Jamba and LFM2 carry across a packed boundary
    # moves log-probs by only 2e-5 (0.2-0.3 at 0.1), so a leak would hide near the tolerance
    initializer_range=0.1,
)
# config fields beyond TINY_SHAPE, for every model type of packing.py's allowlist and of its refusal list
TINY_CONFIGS = {
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8),
    "gemma3_text": dict(head_dim=8),
    "gpt2": {},
    "llama": {},
    "mistral": dict(sliding_window=None),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "phi3": {},
    "qwen2": {},
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "qwen3": dict(head_dim=8),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
    "biogpt": {},
    "bloom": {},
    "mpt": dict(d_model=32, n_heads=4, n_layers=2),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "xglm": dict(d_model=32, ffn_dim=64, attention_heads=4, num_layers=2),
    "jamba": dict(
        num_experts=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4, mamba_expand=2
    ),
    "lfm2": dict(layer_types=["conv", "full_attention"], block_ff_dim=64),
}


def tiny_model(model_type, attention="eager", **extra):
    """A tiny random model of `model_type` in float32; flash-attention through the reference kernels below."""
    config = AutoConfig.for_model(model_type, **{**TINY_SHAPE, **TINY_CONFIGS[model_type], **extra})
    torch.manual_seed(0)
    flash = attention.startswith("flash")
    try:
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="eager" if flash else attention
        ).eval()
    except ValueError as error:  # e.g. Gemma 2 refuses sdpa (softcapping): nothing to pack then
        pytest.skip(f"transformers refuses {attention} for {model_type}: {error}")
    if flash:  # set after loading: the flash-attention package is not installed (reference kernels instead)
        model.config._attn_implementation = attention
    add_fused_lm_head(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Reference: GSPO-token's token component under each formulation (gspo_examples.token_advantages), float64 loops
# (rows grouped by prompt in consecutive blocks of group_size, mask 1 on the loss tokens).


def _stdev(values):
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def reference_token_component(formulation, rewards, mask, group_size, eps=1e-4):
    """The (rows, width) token component as lists of floats, one loop per group, token and position."""
    rows, width = len(rewards), len(rewards[0])
    out = [[0.0] * width for _ in range(rows)]
    for g in range(0, rows, group_size):
        members = range(g, g + group_size)
        cells = [(i, t) for i in members for t in range(width) if mask[i][t]]
        if formulation == "return_to_go":
            values = {(i, t): math.fsum(rewards[i][s] for s in range(t, width) if mask[i][s]) for i, t in cells}
        else:
            values = {(i, t): float(rewards[i][t]) for i, t in cells}
        if formulation == "position_baseline":
            deviation = {}
            for t in range(width):
                at_t = [values[i, t] for i in members if mask[i][t]]
                for i in members:
                    if mask[i][t]:
                        deviation[i, t] = 0.0 if max(at_t) == min(at_t) else values[i, t] - math.fsum(at_t) / len(at_t)
            if len(cells) < 2 or all(d == 0 for d in deviation.values()):
                continue
            scale = math.sqrt(math.fsum(d * d for d in deviation.values()) / (len(cells) - 1))
            for i, t in cells:
                out[i][t] = deviation[i, t] / (scale + eps)
            continue
        if len(cells) < 2 or max(values.values()) == min(values.values()):
            continue
        mean = math.fsum(values.values()) / len(cells)
        std = _stdev(list(values.values()))
        for i, t in cells:
            if formulation == "group_centred" or (formulation == "marked_only" and rewards[i][t] != 0):
                out[i][t] = (values[i, t] - mean) / (std + eps)
            elif formulation in ("scaled", "return_to_go"):
                out[i][t] = values[i, t] / (std + eps)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Seams into a running GSPOTrainer through public names only: what the objective received and returned (with the
# gradient that reached its log-probs), and the experts every MoE router used, in generation and in training
# forwards, laid out as the padded (B, L) rows whatever the pass's layout (padded or packed).


@contextlib.contextmanager
def recording_objective():
    """Within the block every call of GSPOTrainer's objective (`GSPOTrainer.objective`, the seam through which
    `_compute_loss` calls `trl_gspo.objective.compute_policy_objective`) is recorded: a list of dicts with the
    arguments by name (tensors detached and cloned), `out` (the ObjectiveOutput) and, once backward has run, `grad`:
    d loss / d per_token_logps as the trainer's backward saw it."""
    from trl_gspo import GSPOTrainer

    original = GSPOTrainer.objective
    signature = inspect.signature(original)
    records = []

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        record = {
            name: value.detach().clone() if torch.is_tensor(value) else value
            for name, value in bound.arguments.items()
        }
        logps = bound.arguments["per_token_logps"]
        if logps.requires_grad:
            logps.register_hook(lambda grad: record.__setitem__("grad", grad.detach().clone()))
        record["out"] = original(*args, **kwargs)
        records.append(record)
        return record["out"]

    GSPOTrainer.objective = staticmethod(spy)
    try:
        yield records
    finally:
        GSPOTrainer.objective = staticmethod(original)


class RoutingTap:
    """Forward hooks of the test's own on a MoE model's routers, registered after the trainer's (so they see the
    experts a replay forced), recording the experts (`top_k_index`) every router handed to its experts.

    generations: one dict per `model.generate` call: `prompt_ids`, `prompt_mask` (B, Lp), `sequences` (B, Lp + S)
        and `experts` (B, Lp + decoding steps, layers, k): the prefill, then one position per decoding step.
    forwards: one dict per other forward of the model (training passes): `input_ids`, `attention_mask` (B, L) in
        the padded layout and `experts` (B, L, layers, k) there (-1 off the real tokens), `grad` (whether autograd
        was on: the policy pass), `packed`. A packed forward is mapped back to the padded rows through the
        PackedBatch of its `trl_gspo.packing.pack_sequences` call (`packed_index`).
    Router calls outside a model forward (activation checkpointing recomputing a layer in backward) are ignored.
    `generation_context`, when given, is a context manager factory entered around every generate() call.
    """

    def __init__(self, model, generation_context=None):
        self.model = model
        self.routers = find_routers(model)
        self.generations, self.forwards = [], []
        self._generation_context = generation_context or contextlib.nullcontext
        self._generating, self._steps, self._current, self._pending_packing = False, [], None, []
        self._handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            model.register_forward_hook(self._end),
        ]
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._router_hook(layer)))
        self._generate = model.generate
        model.generate = self._generate_and_record  # an instance attribute: trainers that wrap generate keep it
        import trl_gspo.packing as packing

        self._pack_original = packing.pack_sequences
        self._pack_holders = [
            module
            for name, module in list(sys.modules.items())
            if name.split(".")[0] == "trl_gspo" and getattr(module, "pack_sequences", None) is self._pack_original
        ]
        for module in self._pack_holders:
            module.pack_sequences = self._pack_and_record

    def remove(self):
        for handle in self._handles:
            handle.remove()
        del self.model.generate
        for module in self._pack_holders:
            module.pack_sequences = self._pack_original

    def _pack_and_record(self, input_ids, attention_mask, *args, **kwargs):
        packed = self._pack_original(input_ids, attention_mask, *args, **kwargs)
        self._pending_packing.append((input_ids, attention_mask, packed))
        return packed

    def _generate_and_record(self, *args, **kwargs):
        self._generating, self._steps = True, []  # the experts of each forward of this call
        try:
            with self._generation_context():
                sequences = self._generate(*args, **kwargs)
        finally:
            self._generating = False
        batch = kwargs["input_ids"].size(0)
        experts = torch.cat([step.view(batch, -1, *step.shape[1:]) for step in self._steps], dim=1)
        self.generations.append(
            dict(
                prompt_ids=kwargs["input_ids"],
                prompt_mask=kwargs["attention_mask"],
                sequences=sequences,
                experts=experts,
            )
        )
        return sequences

    def _start(self, module, args, kwargs):
        self._current = {
            "layers": {},
            "input_ids": kwargs.get("input_ids"),
            "attention_mask": kwargs.get("attention_mask"),
        }

    def _router_hook(self, layer):
        def hook(module, args, output):
            if self._current is not None:
                self._current["layers"][layer] = output[2].detach().clone()

        return hook

    def _end(self, module, args, output):
        current, self._current = self._current, None
        used = torch.stack([current["layers"][layer] for layer in range(len(self.routers))], dim=1)  # (N, layers, k)
        if self._generating:
            self._steps.append(used)
            return
        packed = current["attention_mask"] is None and bool(self._pending_packing)
        if packed:
            input_ids, attention_mask, packing = self._pending_packing.pop(0)
            index = packing.packed_index
            experts = torch.full((*index.shape, *used.shape[1:]), -1, dtype=used.dtype)
            experts[index >= 0] = used[index[index >= 0]]
        else:
            input_ids, attention_mask = current["input_ids"], current["attention_mask"]
            experts = used.view(*input_ids.shape, *used.shape[1:])
        self.forwards.append(
            dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                experts=experts,
                grad=torch.is_grad_enabled(),
                packed=packed,
            )
        )

    def generation_routing(self, eos_token_id):
        """{token sequence (prompt + completion, as TRL keeps it: cut after the first EOS): [experts of its fed
        positions (len - 1, layers, k), one per generated row with that content]}. The last completion token is
        sampled, never fed: it has no routing."""
        routing = {}
        for generation in self.generations:
            width = generation["prompt_ids"].size(1)
            for row, prompt_mask in enumerate(generation["prompt_mask"].bool()):
                prompt = generation["prompt_ids"][row][prompt_mask].tolist()
                completion = generation["sequences"][row, width:].tolist()
                if eos_token_id in completion:
                    completion = completion[: completion.index(eos_token_id) + 1]
                start = width - len(prompt)
                fed = generation["experts"][row, start : width + len(completion) - 1]
                assert fed.size(0) == len(prompt) + len(completion) - 1, "generation routed fewer positions than fed"
                routing.setdefault(tuple(prompt + completion), []).append(fed)
        return routing


@contextlib.contextmanager
def perturbed_routers(model):
    """The routers moved by N(0, 0.3) noise for the block (restored after): a rollout engine that routes otherwise."""
    routers = find_routers(model)
    saved = [router.weight.detach().clone() for router in routers]
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for router in routers:
            router.weight.add_(0.3 * torch.randn(router.weight.shape, generator=generator))
    try:
        yield
    finally:
        with torch.no_grad():
            for router, weight in zip(routers, saved, strict=True):
                router.weight.copy_(weight)
