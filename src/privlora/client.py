"""One client's round: start from the downlink payload, train LoRA locally, return the uplink.

``run_round`` is what a site runs each round, in the simulation and in a Flower ClientApp: it
rebuilds its start adapter from the (decoded) payload alone (``protocol.client_start``), runs
``local_update`` (K steps on the LoRA parameters, one visible loop) and sends the update,
compressed by stochastic rounding when ``quantization.uplink_bits`` is set.
In sample mode each step is a DP-SGD step (``gradient_step``): Poisson-sampled examples,
per-example gradients clipped by their joint L2 norm over all trained LoRA tensors, summed,
noised, divided by a configured constant. In local mode the whole update is clipped jointly
and noised before it leaves. A client takes only what a site has: its data, the payload, its
spec, its generators.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from privlora import protocol
from privlora.aggregation import truncate_rank
from privlora.config import RunConfig
from privlora.data import Example, collate
from privlora.lm import device_of, per_example_loss
from privlora.lora import (
    Adapter,
    LoraHandles,
    first_components,
    flatten,
    is_factor_b,
    read_adapter,
    set_trainable,
    trained_parameters,
    write_adapter,
)
from privlora.lr_schedule import scheduled_lr
from privlora.models import compute_threads, gradient_checkpointing, wants_checkpointing
from privlora.privacy.audit import GradientCanaries, ReleaseCanaries
from privlora.privacy.central import CentralDP
from privlora.privacy.client_dp import LocalDP, SampleDP
from privlora.privacy.mechanisms import clip_per_example, seeded_generator, uniform
from privlora.privacy.per_example import PerExampleGrads
from privlora.privacy.plan import PrivacyPlan
from privlora.privacy.site import SiteBudget, release_of
from privlora.quantization import codec
from privlora.quantization.bins import BinNoise
from privlora.rules import Rule

# Messages that stay with the party that logs them: never written to the run directory.
local_log = logging.getLogger("privlora.local")


@dataclass(frozen=True)
class LocalSpec:
    """What a client does in one round (built from the config and the privacy plan)."""

    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    lr_schedule: str = "constant"  # train.lr_schedule, over the run's total_steps local steps
    total_steps: int = 0  # federation.rounds x local_steps: the schedule's length (0: unset)
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    train_a: bool = True  # False for FFA-LoRA: A stays frozen and is never sent
    rank: int | None = None  # heterogeneous ranks: components beyond this stay zero
    sample_dp: SampleDP | None = None  # DP-SGD inside the steps (sample mode)
    local_dp: LocalDP | None = None  # clip + noise on the release (local mode)
    server_dp: CentralDP | None = None  # client mode: the noise the server says it adds
    send_counts: bool = True  # example count and loss beside the update: never under DP
    microbatch: int = 32  # examples per forward; a larger batch is split and summed
    uplink_bits: int = 0  # 8 or 4: stochastic rounding of the update as sent (after any noise)
    label_tokens: tuple[int, ...] = ()  # train.loss = "label": the softmax's tokens; () = answer
    canaries: GradientCanaries | None = None  # privlora audit only: white-box canaries here
    release_canaries: ReleaseCanaries | None = None  # privlora audit only (local mode)
    threads: int = 1  # train.threads: CPU threads of the round (0 = torch's default)
    gradient_checkpointing: str = "off"  # train.gradient_checkpointing: "auto", "on" or "off"
    base_noise: BinNoise | None = None  # quantization.base_noise = "bin": the model's bins


@dataclass(frozen=True)
class Site:
    """What one client holds: its id, its tokenized examples and what it does each round."""

    client_id: int
    examples: list[Example]
    spec: LocalSpec
    budget: SiteBudget | None = None  # the site's own cap and ledger, checked every round


@dataclass
class LocalResult:
    """A round's outcome at the client: what it sends, and what stays with it."""

    delta: dict[str, torch.Tensor]  # flat wire names; B only for FFA; noised under DP
    meta: dict[str, float]  # sent beside the tensors: nothing under DP
    local_log: dict[str, int]  # counts for the site's own log (never sent, never published)


@dataclass(frozen=True)
class StepResult:
    loss: float  # the batch's mean answer loss (stays at the client)
    nonfinite: int  # examples whose gradient was not finite and counted as zero (DP-SGD)
    tokens: int  # real (unpadded) tokens in the step's batch


def rank_of(config: RunConfig, client_id: int) -> int | None:
    """Return a client's LoRA rank when ranks are heterogeneous (cycled), else None."""
    ranks = config.lora.client_ranks
    return ranks[client_id % len(ranks)] if ranks else None


def spec_for(config: RunConfig, rule: Rule, plan: PrivacyPlan, rank: int | None,
             label_tokens: tuple[int, ...] = (), base_noise: BinNoise | None = None
             ) -> LocalSpec:
    """Build what a client does each round from the config, the rule and the privacy plan
    (``label_tokens`` from ``evaluate.training_label_tokens``; ``base_noise`` the bins of the
    client's quantized base under ``quantization.base_noise = "bin"``)."""
    t = config.train
    return LocalSpec(steps=t.local_steps, batch_size=t.batch_size, lr=t.lr,
                     lr_schedule=t.lr_schedule,
                     total_steps=config.federation.rounds * t.local_steps,
                     optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay,
                     train_a=rule.trains_a,
                     rank=rank, sample_dp=plan.training_mechanism(),
                     local_dp=plan.release_mechanism(), server_dp=plan.central_mechanism(),
                     send_counts=not plan.private,
                     microbatch=t.microbatch, uplink_bits=config.quantization.uplink_bits,
                     label_tokens=label_tokens, threads=t.threads,
                     gradient_checkpointing=t.gradient_checkpointing,
                     base_noise=base_noise)


def run_round(handles: LoraHandles, init: Adapter, site: Site, payload: protocol.Payload,
              seed: int, round_: int, pad_id: int,
              on_step: Callable[[int], None] | None = None, run: str = "") -> protocol.Payload:
    """Train from what ``payload`` carries; return the uplink payload.

    ``init`` is the adapter this site derived from the shared LoRA seed (shapes; FFA's A).
    Generators are seeded by (seed, round, client id, purpose); under DP the noise and the
    Poisson draws ignore them unless privacy.reproducible_noise is set. A site with a budget
    charges its own ledger for round ``round_`` of run ``run`` before anything is trained, or
    refuses (``SiteRefused``) and sends nothing.
    """
    start = protocol.client_start(payload, init, site.spec.train_a)
    if site.budget is not None:
        spec = site.spec
        site.budget.spend(release_of(spec.steps, spec.sample_dp, spec.local_dp, spec.server_dp),
                          run, round_, hashlib.sha256(payload.to_bytes()).hexdigest())
    with compute_threads(site.spec.threads):  # the same sums in every runtime (train.threads)
        result = local_update(handles, start, site.examples, site.spec,
                              seeded_generator(seed, round_, site.client_id, "batches"),
                              seeded_generator(seed, round_, site.client_id, "noise"), pad_id,
                              on_step, seeded_generator(seed, round_, site.client_id, "bins"),
                              first_step=(round_ - 1) * site.spec.steps)
    if any(result.local_log.values()):
        local_log.warning("client %d round %d: %s", site.client_id, round_, result.local_log)
    return codec.pack_update(protocol.Payload(result.delta, result.meta), site.spec.uplink_bits,
                             seeded_generator(seed, round_, site.client_id, "rounding"))


def local_update(handles: LoraHandles, start: Adapter, examples: list[Example], spec: LocalSpec,
                 batch_rng: torch.Generator, noise_rng: torch.Generator, pad_id: int,
                 on_step: Callable[[int], None] | None = None,
                 bins_rng: torch.Generator | None = None, first_step: int = 0) -> LocalResult:
    """Train from ``start`` for ``spec.steps`` steps; return the update to send.

    ``first_step`` is the index of this round's first step among the run's local steps
    (``(round - 1) x steps``), where ``spec.lr_schedule`` reads its rate.

    ``on_step(tokens)`` is called after each step (a progress display). With
    ``spec.base_noise`` each step trains on a fresh draw of the quantized base within its bins
    (from ``bins_rng``), and the grid values are back when this returns.
    """
    write_adapter(handles, start)
    optimizer = _optimizer(set_trainable(handles, train_a=spec.train_a), spec)
    named = trained_parameters(handles, spec.train_a)
    handles.model.train()
    losses, nonfinite = [], 0
    # Why: LoRA dropout draws from the global RNG; seed it from this client's stream so that
    # runs stay bit-identical, without disturbing the caller's global RNG state.
    device = device_of(handles.model)
    checkpointing = wants_checkpointing(spec.gradient_checkpointing, handles.model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            gradient_checkpointing(handles.model, checkpointing), _on_grid(spec.base_noise):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=batch_rng)))
        for step_index in range(first_step, first_step + spec.steps):
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(spec.lr, spec.lr_schedule, step_index, spec.total_steps)
            if spec.base_noise is not None:
                if bins_rng is None:
                    raise ValueError("spec.base_noise needs bins_rng")
                spec.base_noise.draw(bins_rng)
            step = gradient_step(handles, examples, spec, named, batch_rng, noise_rng, pad_id)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if spec.rank is not None:  # keep components beyond the client's rank at zero
                write_adapter(handles, truncate_rank(read_adapter(handles), spec.rank))
            losses.append(step.loss)
            nonfinite += step.nonfinite
            if on_step is not None:
                on_step(step.tokens)
    handles.model.eval()
    delta = _delta(read_adapter(handles), start, spec.train_a, spec.rank)
    log = {"nonfinite_examples": nonfinite}
    if spec.local_dp is not None:
        delta, finite = spec.local_dp.release(delta, noise_rng)
        log["nonfinite_updates"] = int(not finite)
        if spec.release_canaries is not None:  # privlora audit: the same mechanism, on canaries
            local_dp = spec.local_dp
            spec.release_canaries.observe(lambda update: local_dp.release(update, noise_rng)[0])
    if not spec.send_counts:
        return LocalResult(delta, {}, log)  # under DP only the (noised or clipped) update leaves
    meta = {"num_examples": float(len(examples)), "train_loss": sum(losses) / len(losses)}
    return LocalResult(delta, meta, log)


@contextlib.contextmanager
def _on_grid(base_noise: BinNoise | None):
    """Put the quantized base's grid values back however the steps end."""
    try:
        yield
    finally:
        if base_noise is not None:
            base_noise.restore()


def gradient_step(handles: LoraHandles, examples: list[Example], spec: LocalSpec,
                  named: dict[str, torch.nn.Parameter], batch_rng: torch.Generator,
                  noise_rng: torch.Generator, pad_id: int) -> StepResult:
    """Set ``.grad`` of the trained LoRA weights for one local step; return the batch loss.

    Without ``spec.sample_dp``: the mean answer loss of a uniform batch of ``batch_size``.
    With it, one DP-SGD step (Abadi et al. 2016, Alg. 1): each example joins with probability q
    (Poisson, as the accountant's PoissonSampled event assumes; the batch may be empty), its
    gradient is clipped jointly to C, the sum is noised and divided by the configured divisor.
    """
    dp, device = spec.sample_dp, device_of(handles.model)
    if dp is None:
        chosen = _uniform_batch(examples, spec.batch_size, batch_rng)
    else:  # each example joins with probability q: Poisson, as the accountant assumes
        draws = uniform(len(examples), batch_rng, secure=dp.secure)
        chosen = [examples[i] for i in (draws < dp.sample_rate).nonzero()[:, 0].tolist()]
    summed = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
    loss_sum, nonfinite, tokens = 0.0, 0, 0
    # Why: memory grows with the examples in one forward; chunks of similar length (sorted)
    # bound it and waste little on padding. The sum over chunks is the sum over the batch.
    chosen.sort(key=lambda e: len(e.prompt) + len(e.answer))
    for start in range(0, len(chosen), spec.microbatch):
        batch = collate(chosen[start : start + spec.microbatch], pad_id).to(device)
        tokens += int(batch.attention_mask.sum())
        if dp is None:
            per_example = per_example_loss(handles.model, batch, spec.label_tokens)
            per_example.sum().backward()  # .grad accumulates the sum over chunks
        else:
            with PerExampleGrads(handles, train_a=spec.train_a) as tracker:
                per_example = per_example_loss(handles.model, batch, spec.label_tokens)
                per_example.sum().backward()  # a SUM: each example's gradient stays its own
                clipped, norms = clip_per_example(tracker.collect(), dp.clip)
            summed = {name: summed[name] + clipped[name] for name in summed}
            nonfinite += int((~torch.isfinite(norms)).sum())
        loss_sum += float(per_example.detach().sum())
    loss = loss_sum / len(chosen) if chosen else 0.0
    canary = _canary_gradients(spec, batch_rng)
    if dp is None:  # the mean answer loss of the batch: divide the accumulated sum
        for name, param in named.items():
            if param.grad is not None:
                if canary is not None:
                    param.grad += canary[name].to(param.grad.device, param.dtype)
                param.grad /= len(chosen)
        return StepResult(loss, 0, tokens)
    if canary is not None:  # already on the clip bound: they join the clipped sum
        summed = {name: summed[name] + canary[name].to(summed[name].device) for name in summed}
    noisy = dp.noisy_gradient(summed, noise_rng)
    for name, param in named.items():
        param.grad = noisy[name].to(param.dtype)
    return StepResult(loss, nonfinite, tokens)


def _canary_gradients(spec: LocalSpec, batch_rng: torch.Generator
                      ) -> dict[str, torch.Tensor] | None:
    """Return the summed gradients of the audit's canaries that join this step (None outside
    ``privlora audit``): under DP each included canary joins with the examples' Poisson rate,
    drawn as theirs are; without DP every included one joins every step."""
    canaries, dp = spec.canaries, spec.sample_dp
    if canaries is None:
        return None
    ids = torch.tensor([i for i, x in enumerate(canaries.included) if x], dtype=torch.long)
    if dp is not None:
        draws = uniform(len(ids), batch_rng, secure=dp.secure)
        ids = ids[draws < dp.sample_rate]
    return canaries.gradient_sum(ids)


def _optimizer(params: list[torch.nn.Parameter], spec: LocalSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _uniform_batch(examples: list[Example], size: int, rng: torch.Generator) -> list[Example]:
    picks = torch.randperm(len(examples), generator=rng)[: min(size, len(examples))]
    return [examples[i] for i in picks.tolist()]


def _delta(after: Adapter, before: Adapter, train_a: bool,
           rank: int | None) -> dict[str, torch.Tensor]:
    """Return the flat factor update after - before, as sent: B only when A is frozen, and only
    the client's own ``rank`` components (rows of A, columns of B) when ranks differ."""
    flat_after, flat_before = flatten(after), flatten(before)
    delta = {name: flat_after[name] - flat_before[name]
             for name in flat_after if train_a or is_factor_b(name)}
    return delta if rank is None else first_components(delta, rank)
