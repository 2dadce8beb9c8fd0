"""One client's round of work: ``local_update`` runs K local steps on LoRA parameters only.

The training loop is one visible loop. In sample mode (DP-LoRA done right) each step is a
DP-SGD step: Poisson-sampled examples, per-example gradients clipped by their joint L2 norm over
all trained LoRA tensors, summed, Gaussian noise added. In local mode (DP-FedLoRA) the whole
update is clipped jointly and noised before it leaves the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dp_accounting
import torch

from privlora.aggregation import truncate_rank
from privlora.data import Example, collate
from privlora.lm import per_example_loss
from privlora.lora import (
    Adapter,
    LoraHandles,
    first_components,
    flatten,
    lora_linears,
    read_adapter,
    set_trainable,
    write_adapter,
)
from privlora.privacy import accounting
from privlora.privacy.mechanisms import add_noise, clip, clip_per_example, uniform
from privlora.privacy.per_example import PerExampleGrads


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD inside the client: per-example clip, Poisson rate, noise std = sigma * clip."""

    clip: float
    noise_multiplier: float
    sample_rate: float
    secure: bool = False


@dataclass(frozen=True)
class LocalDP:
    """Local DP on the whole release: joint clip; noise std = sigma * 2 * clip (replace-one)."""

    clip: float
    noise_multiplier: float
    secure: bool = False


@dataclass(frozen=True)
class LocalSpec:
    """What a client does in one round."""

    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    train_a: bool = True  # False for FFA-LoRA: A stays frozen and is never sent
    rank: int | None = None  # heterogeneous ranks: components beyond this stay zero
    sample_dp: SampleDP | None = None
    local_dp: LocalDP | None = None


@dataclass
class ClientUpdate:
    """What a client sends back: the (clipped, noised if private) factor update and metadata."""

    client_id: int
    delta: dict[str, torch.Tensor]  # flat wire names, lora.flatten order; B only for FFA
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    events: list[dp_accounting.DpEvent] = field(default_factory=list)


def local_update(handles: LoraHandles, global_adapter: Adapter, examples: list[Example],
                 spec: LocalSpec, client_id: int, batch_rng: torch.Generator,
                 noise_rng: torch.Generator, pad_id: int) -> ClientUpdate:
    """Train from ``global_adapter`` for ``spec.steps`` steps; return the update to send."""
    start = global_adapter if spec.rank is None else truncate_rank(global_adapter, spec.rank)
    write_adapter(handles, start)
    params = set_trainable(handles, train_a=spec.train_a)
    optimizer = _optimizer(params, spec)
    named = _named_params(handles, spec.train_a)
    handles.model.train()
    # Why: LoRA dropout draws from the global RNG; seed it from this client's stream so that
    # runs stay bit-identical, without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=batch_rng)))
        losses = _train(handles, examples, spec, named, batch_rng, noise_rng, optimizer, pad_id)
    handles.model.eval()
    delta = _delta(read_adapter(handles), start, spec.train_a, spec.rank)
    events: list[dp_accounting.DpEvent] = []
    if spec.sample_dp is not None:
        dp = spec.sample_dp
        events.append(accounting.sample_mode_event(dp.sample_rate, dp.noise_multiplier, spec.steps))
    if spec.local_dp is not None:
        delta, _norm = clip(delta, spec.local_dp.clip)
        std = spec.local_dp.noise_multiplier * 2 * spec.local_dp.clip  # sensitivity 2C
        delta = add_noise(delta, std, noise_rng, secure=spec.local_dp.secure)
        events.append(accounting.local_mode_event(spec.local_dp.noise_multiplier, 1))
    if spec.sample_dp is not None or spec.local_dp is not None:
        # Under DP only the noised update leaves the client: no loss, no example count.
        return ClientUpdate(client_id, delta, 0, {}, events)
    metrics = {"train_loss": sum(losses) / len(losses)}
    return ClientUpdate(client_id, delta, len(examples), metrics, events)


def _train(handles: LoraHandles, examples: list[Example], spec: LocalSpec,
           named: dict[str, torch.nn.Parameter], batch_rng: torch.Generator,
           noise_rng: torch.Generator, optimizer: torch.optim.Optimizer,
           pad_id: int) -> list[float]:
    """Run the local steps (the training loop); return each step's batch loss."""
    losses = []
    for _ in range(spec.steps):
        if spec.sample_dp is None:
            batch = _uniform_batch(examples, spec.batch_size, batch_rng)
            loss = per_example_loss(handles.model, collate(batch, pad_id)).mean()
            loss.backward()
        else:
            loss = _dp_sgd_gradients(handles, examples, spec, named, batch_rng, noise_rng, pad_id)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if spec.rank is not None:  # keep components beyond the client's rank at zero
            write_adapter(handles, truncate_rank(read_adapter(handles), spec.rank))
        losses.append(loss.item())
    return losses


def _dp_sgd_gradients(handles: LoraHandles, examples: list[Example], spec: LocalSpec,
                      named: dict[str, torch.nn.Parameter], batch_rng: torch.Generator,
                      noise_rng: torch.Generator, pad_id: int) -> torch.Tensor:
    """Set ``.grad`` to one DP-SGD gradient (Abadi et al. 2016, Alg. 1); return the batch loss."""
    dp = spec.sample_dp
    if dp is None:
        raise ValueError("DP-SGD gradients need LocalSpec.sample_dp")
    # Poisson sampling: each example joins independently with probability q (the accountant's
    # PoissonSampled event assumes exactly this; the batch size is random and may be 0).
    draws = uniform(len(examples), batch_rng, secure=dp.secure)
    chosen = (draws < dp.sample_rate).nonzero()[:, 0]
    summed = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
    loss = torch.tensor(0.0)
    if len(chosen):
        batch = collate([examples[i] for i in chosen.tolist()], pad_id)
        with PerExampleGrads(handles, train_a=spec.train_a) as tracker:
            per_example = per_example_loss(handles.model, batch)
            per_example.sum().backward()  # a SUM: each example's gradient stays its own
            summed, _ = clip_per_example(tracker.collect(), dp.clip)
        loss = per_example.mean().detach()
    noisy = add_noise(summed, dp.noise_multiplier * dp.clip, noise_rng, secure=dp.secure)
    expected_batch = dp.sample_rate * len(examples)  # fixed denominator keeps the sensitivity C
    for name, param in named.items():
        param.grad = (noisy[name] / expected_batch).to(param.dtype)
    return loss


def _named_params(handles: LoraHandles, train_a: bool) -> dict[str, torch.nn.Parameter]:
    named = {}
    for layer, (a, b) in lora_linears(handles).items():
        if train_a:
            named[f"{layer}.lora_A"] = a.weight
        named[f"{layer}.lora_B"] = b.weight
    return dict(sorted(named.items()))


def _optimizer(params: list[torch.nn.Parameter], spec: LocalSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _uniform_batch(examples: list[Example], size: int, rng: torch.Generator) -> list[Example]:
    picks = torch.randperm(len(examples), generator=rng)[: min(size, len(examples))]
    return [examples[i] for i in picks.tolist()]


def _delta(after: Adapter, before: Adapter, train_a: bool,
           rank: int | None) -> dict[str, torch.Tensor]:
    """Return the flat factor update after - before, as sent: B only when A is frozen, and only
    the client's own ``rank`` components (rows of A, columns of B) when ranks differ."""
    flat_after, flat_before = flatten(after), flatten(before)
    delta = {
        name: flat_after[name] - flat_before[name]
        for name in flat_after
        if train_a or name.endswith(".lora_B")
    }
    return delta if rank is None else first_components(delta, rank)
