"""The in-process simulation: one base model shared by every simulated client; the round loop.

Only LoRA tensors are per client (loaded into the shared PEFT model before a client's update,
read out after), so memory does not grow with the number of clients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from privlora import aggregation, client, data
from privlora.communication import full_finetune_bytes, payload_bytes
from privlora.config import RunConfig
from privlora.errors import InvalidUpdate, PrivacyBudgetExceeded
from privlora.evaluate import EvalResult, evaluate
from privlora.lora import (
    Adapter,
    Factors,
    LoraHandles,
    LoraSpec,
    attach,
    first_components,
    flatten,
    read_adapter,
    write_adapter,
)
from privlora.models import load_model, load_tokenizer
from privlora.privacy.central import noisy_mean
from privlora.privacy.ledger import PrivacyLedger
from privlora.privacy.mechanisms import seeded_generator, uniform
from privlora.privacy.plan import PrivacyPlan, make_plan
from privlora.run_dir import RunDir, Traffic


@dataclass
class Federation:
    """Everything a run needs, built once from the config."""

    config: RunConfig
    handles: LoraHandles
    tokenizer: PreTrainedTokenizerBase
    task: data.Task
    clients: list[list[data.Example]]
    eval_examples: list[data.Example]
    plan: PrivacyPlan | None
    full_model_bytes: int

    def mean_payload_bytes(self) -> float:
        """Mean over all clients of one transfer's size (a downlink, and so its uplink: the
        same tensors, see check_uplink). Set by shapes alone, so it reveals no participation."""
        adapter = read_adapter(self.handles)
        sizes = [payload_bytes(downlink(self.config, adapter, cid))
                 for cid in range(self.config.federation.num_clients)]
        return sum(sizes) / len(sizes)


def lora_spec(config: RunConfig) -> LoraSpec:
    """Return the LoRA hyper-parameters of ``config``."""
    c = config.lora
    return LoraSpec(c.rank, c.alpha, c.dropout, tuple(c.target_modules))


def prepare(config: RunConfig) -> Federation:
    """Load data, model and LoRA; partition clients; plan privacy (refusing an overspend)."""
    task = data.load_task(config.data, config.seed)
    train_rows, eval_rows = data.split(task, config.data.eval_fraction, config.data.max_eval,
                                       config.seed)
    parts = data.partition(train_rows, config.data, config.federation.num_clients, config.seed)
    plan = make_plan(config, [len(p) for p in parts])  # before loading the model: fail fast
    tokenizer = load_tokenizer(config.model.name)
    clients = [data.tokenize(p, task, tokenizer, config.data.max_length) for p in parts]
    eval_examples = data.tokenize(eval_rows, task, tokenizer, config.data.max_length)
    model = load_model(config.model.name, config.model.dtype)
    full_bytes = full_finetune_bytes(model)
    handles = attach(model, lora_spec(config), seed=config.seed)
    return Federation(config, handles, tokenizer, task, clients, eval_examples, plan, full_bytes)


def sample_clients(config: RunConfig, plan: PrivacyPlan | None, round_: int) -> list[int]:
    """Choose this round's clients from a generator seeded by (seed, round)."""
    fed = config.federation
    rng = seeded_generator(config.seed, round_, "clients")
    if plan is not None and plan.mode == "client":
        # Poisson sampling at rate q, as the accountant's amplification-by-sampling assumes.
        draws = uniform(fed.num_clients, rng, secure=config.privacy.secure_rng)
        return (draws < plan.sample_rate).nonzero()[:, 0].tolist()
    if fed.per_round == fed.num_clients:
        return list(range(fed.num_clients))
    return sorted(torch.randperm(fed.num_clients, generator=rng)[: fed.per_round].tolist())


def client_rank(config: RunConfig, client_id: int) -> int | None:
    """Return a client's LoRA rank when ranks are heterogeneous (cycled), else None."""
    ranks = config.lora.client_ranks
    return ranks[client_id % len(ranks)] if ranks else None


def local_spec(config: RunConfig, plan: PrivacyPlan | None, client_id: int) -> client.LocalSpec:
    """Build what one client does this round from the config and the privacy plan."""
    t, p = config.train, config.privacy
    sample_dp = local_dp = None
    if plan is not None and plan.mode == "sample":
        sample_dp = client.SampleDP(p.clip, plan.noise_multiplier, plan.sample_rate, p.secure_rng)
    if plan is not None and plan.mode == "local":
        local_dp = client.LocalDP(p.clip, plan.noise_multiplier, p.secure_rng)
    return client.LocalSpec(
        steps=t.local_steps, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
        weight_decay=t.weight_decay, train_a=config.federation.aggregation != "ffa",
        rank=client_rank(config, client_id), sample_dp=sample_dp, local_dp=local_dp,
    )


def downlink(config: RunConfig, global_adapter: Adapter, client_id: int) -> dict[str, torch.Tensor]:
    """Return the tensors the server sends a client (FFA: B only; A comes from the shared seed)."""
    rank = client_rank(config, client_id)
    flat = flatten(global_adapter)
    if rank is not None:  # a rank-r client receives the top r components of the SVD-ordered global
        flat = first_components(flat, rank)
    if config.federation.aggregation == "ffa":
        return {k: v for k, v in flat.items() if k.endswith(".lora_B")}
    return flat


def check_uplink(update: client.ClientUpdate, sent: dict[str, torch.Tensor]) -> None:
    """Refuse an update whose tensors are not those the client received (names and shapes)."""
    got = {k: tuple(v.shape) for k, v in update.delta.items()}
    want = {k: tuple(v.shape) for k, v in sent.items()}
    if got == want:
        return
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    reshaped = [f"{k} {got[k]} != {want[k]}" for k in sorted(set(got) & set(want))
                if got[k] != want[k]]
    raise InvalidUpdate(
        f"client {update.client_id} sent tensors that differ from what it received: "
        f"unexpected {extra[:3]}, missing {missing[:3]}, wrong shape {reshaped[:3]}; a client "
        "must return an update for exactly the LoRA tensors of its downlink"
    )


def apply_delta(global_adapter: Adapter, delta: dict[str, torch.Tensor]) -> Adapter:
    """Return a client's factors: its global start plus its delta.

    Factors absent from ``delta`` are kept (FFA's frozen A). A rank-r client's delta covers its
    first r components; its start had the rest zeroed, so they stay zero.
    """
    adapter = {}
    for name, f in global_adapter.items():
        a_delta, b_delta = delta.get(f"{name}.lora_A"), delta.get(f"{name}.lora_B")
        rank = (a_delta.shape[0] if a_delta is not None else
                b_delta.shape[1] if b_delta is not None else f.A.shape[0])
        a, b = f.A.clone(), f.B.clone()
        a[rank:], b[:, rank:] = 0, 0
        if a_delta is not None:
            a[:rank] += a_delta
        if b_delta is not None:
            b[:, :rank] += b_delta
        adapter[name] = Factors(A=a, B=b)
    return adapter


def aggregate_round(fed: Federation, global_adapter: Adapter, updates: list[client.ClientUpdate],
                    round_: int) -> tuple[Adapter, dict[str, float]]:
    """Aggregate this round's updates by the configured rule (central DP noise in client mode)."""
    config, plan = fed.config, fed.plan
    rule, spec = config.federation.aggregation, lora_spec(config)
    central = plan is not None and plan.mode == "client"
    if not updates and not central:  # client mode noises even an empty round
        return global_adapter, {}
    if rule == "exact":
        return _exact_round(fed, global_adapter, updates, round_)
    if central:
        return _central_factor_round(fed, global_adapter, updates, round_), {}
    adapters = [apply_delta(global_adapter, u.delta) for u in updates]
    return aggregation.aggregate(rule, adapters, _weights(fed, updates), spec.rank, spec.scale)


def _weights(fed: Federation, updates: list[client.ClientUpdate]) -> list[float]:
    """Clients' weights: their example counts, or equal weights under DP (counts are private)."""
    return [1.0 if fed.plan is not None else float(u.num_examples) for u in updates]


def _central_factor_round(fed: Federation, global_adapter: Adapter,
                          updates: list[client.ClientUpdate], round_: int) -> Adapter:
    """DP-FedAvg (McMahan et al. 2018) on the factors sent (fedavg: A and B; ffa: B only)."""
    config, plan = fed.config, fed.plan
    if plan is None:
        raise ValueError("central DP aggregation needs a client-mode privacy plan")
    template = {k: v for k, v in flatten(global_adapter).items()
                if config.federation.aggregation != "ffa" or k.endswith(".lora_B")}
    mean = noisy_mean([u.delta for u in updates], template, plan.clip, plan.noise_std,
                      plan.sample_rate * config.federation.num_clients,
                      seeded_generator(config.seed, round_, "server", "noise"),
                      config.privacy.secure_rng)
    return apply_delta(global_adapter, mean)


def _exact_round(fed: Federation, global_adapter: Adapter, updates: list[client.ClientUpdate],
                 round_: int) -> tuple[Adapter, dict[str, float]]:
    """exact: global product + mean of the clients' product changes, re-factorised by SVD.

    Each client's change of scale * B A is measured from its own start (its rank's share of the
    global adapter). With equal ranks every start is the global adapter, so this is exactly the
    weighted mean of the products B_k A_k; with mixed ranks a low-rank client moves the global
    product by what it learned, not by the components it never received. In client mode these
    changes are what is clipped and noised (DP-FedAvg on products), so both modes follow one rule.
    Products are formed one client at a time: memory is one client's d_out x d_in per layer.
    """
    config, plan, spec = fed.config, fed.plan, lora_spec(fed.config)
    base = aggregation.mean_products([global_adapter], [1.0], [spec.scale])
    changes = (_product_change(config, global_adapter, u, spec.scale) for u in updates)
    if plan is not None and plan.mode == "client":
        mean = noisy_mean(changes, base, plan.clip, plan.noise_std,
                          plan.sample_rate * config.federation.num_clients,
                          seeded_generator(config.seed, round_, "server", "noise"),
                          config.privacy.secure_rng)
    else:
        weights = aggregation.normalise_weights(_weights(fed, updates))
        mean = aggregation.weighted_sum(changes, weights)
    return aggregation.refactorize({k: base[k] + mean[k] for k in base}, spec.rank, spec.scale)


def _product_change(config: RunConfig, global_adapter: Adapter, update: client.ClientUpdate,
                    scale: float) -> dict[str, torch.Tensor]:
    start = _client_start(config, global_adapter, update.client_id)
    return aggregation.product_change(start, apply_delta(start, update.delta), scale)


def run(config: RunConfig, out: Path, progress=None) -> dict:
    """Run the whole federated fine-tune; write the run directory; return the summary."""
    started = time.time()
    fed = prepare(config)
    run_dir = RunDir.create(out, config, fed)
    ledger = _ledger(fed.plan)
    global_adapter = read_adapter(fed.handles)
    zero_shot = _evaluate(fed, global_adapter)
    run_dir.log_round(0, zero_shot, [], {}, 0.0, ledger, fed, {})
    for round_ in range(1, config.federation.rounds + 1):
        t0 = time.time()
        ids = sample_clients(config, fed.plan, round_)
        _check_budget(fed, ledger, ids)
        updates, traffic = [], {}
        for cid in (progress.clients(round_, ids) if progress else ids):
            sent = downlink(config, global_adapter, cid)
            update = client.local_update(
                fed.handles, _client_start(config, global_adapter, cid), fed.clients[cid],
                local_spec(config, fed.plan, cid), cid,
                seeded_generator(config.seed, round_, cid, "batches"),
                seeded_generator(config.seed, round_, cid, "noise"), fed.tokenizer.pad_token_id)
            check_uplink(update, sent)
            traffic[cid] = Traffic(up=payload_bytes(update.delta), down=payload_bytes(sent))
            updates.append(update)
        global_adapter, diagnostics = aggregate_round(fed, global_adapter, updates, round_)
        _record(fed, ledger, updates)
        result = _evaluate(fed, global_adapter)
        run_dir.log_round(round_, result, updates, traffic, time.time() - t0, ledger, fed,
                          diagnostics)
        run_dir.checkpoint(round_, fed, global_adapter, ledger)
        if progress:
            progress.round_done(round_, result, ledger.epsilon() if ledger else None)
    return run_dir.finish(fed, global_adapter, ledger, zero_shot, result, time.time() - started)


def _client_start(config: RunConfig, global_adapter: Adapter, client_id: int) -> Adapter:
    rank = client_rank(config, client_id)
    return global_adapter if rank is None else aggregation.truncate_rank(global_adapter, rank)


def _evaluate(fed: Federation, adapter: Adapter) -> EvalResult:
    write_adapter(fed.handles, adapter)
    return evaluate(fed.handles.model, fed.eval_examples, fed.task, fed.tokenizer)


def _ledger(plan: PrivacyPlan | None) -> PrivacyLedger | None:
    return None if plan is None else PrivacyLedger(plan.delta, plan.neighbouring)


def _record(fed: Federation, ledger: PrivacyLedger | None, updates: list) -> None:
    """Add this round's privacy events: per client (sample, local) or global (client mode)."""
    if ledger is None or fed.plan is None:
        return
    if fed.plan.mode == "client":
        ledger.record("global", fed.plan.event(1))
        return
    for u in updates:
        for event in u.events:
            ledger.record(f"client-{u.client_id}", event)


def _check_budget(fed: Federation, ledger: PrivacyLedger | None, ids: list[int]) -> None:
    """Refuse a round whose events would take any party past privacy.target_epsilon."""
    plan = fed.plan
    if ledger is None or plan is None or plan.target_epsilon is None:
        return
    steps = fed.config.train.local_steps if plan.mode == "sample" else 1
    parties = ["global"] if plan.mode == "client" else [f"client-{i}" for i in ids]
    for party in parties:
        if ledger.would_exceed(party, plan.event(steps), plan.target_epsilon, plan.accountant):
            raise PrivacyBudgetExceeded(
                f"round would take {party} past privacy.target_epsilon = {plan.target_epsilon}; "
                "stop here, or start a new run with a larger budget"
            )
