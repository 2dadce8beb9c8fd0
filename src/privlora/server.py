"""The in-process simulation: the round loop over the protocol, one base model for every client.

``run`` calls only the round protocol (``privlora.protocol``), ``client.run_round`` and
evaluation. Every payload crosses an in-process wire as bytes, exactly as it would cross the
network, and a client starts from what arrived. Only LoRA tensors are per client (loaded into
the shared PEFT model for a client's update), so memory does not grow with the clients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from privlora import client, data, protocol, records
from privlora.communication import full_finetune_bytes
from privlora.config import RunConfig, to_toml
from privlora.evaluate import EvalResult, evaluate, majority_share
from privlora.lora import (
    Adapter,
    LoraHandles,
    attach,
    flatten,
    read_adapter,
    released_coordinates,
    save_peft,
    write_adapter,
)
from privlora.lora import spec_of as lora_spec_of
from privlora.models import load_model, load_tokenizer
from privlora.privacy.ledger import PrivacyLedger
from privlora.privacy.mechanisms import seeded_generator
from privlora.privacy.plan import PrivacyPlan, make_plan, predicted_signal
from privlora.privacy.signal import NoiseToSignal
from privlora.quantization import codec
from privlora.quantization.bundle import Manifest, distribute
from privlora.rules import Rule, build_rule
from privlora.run_dir import RunDir, check_target


@dataclass(frozen=True)
class Server:
    """What the server holds: the rule, the privacy plan, client ranks, its held-out eval set."""

    rule: Rule
    plan: PrivacyPlan
    ranks: tuple[int | None, ...]  # per client id; None = lora.rank
    task: data.Task
    eval_examples: list[data.Example]
    full_model_bytes: int
    signal: NoiseToSignal | None  # the plan's learn / won't-learn prediction (None without DP)
    bundle: Manifest | None  # FedLPP: the quantized base-model bundle the clients received
    general: list[data.Example]  # general text for the model-privacy perplexity ([] = none)


@dataclass
class Simulation:
    """The in-process runtime: the server, the sites, and the one base model they share."""

    config: RunConfig
    server: Server
    sites: list[client.Site]
    handles: LoraHandles  # the clients' model: the dequantized bundle under FedLPP
    central: LoraHandles  # the server's full-precision model (``handles`` itself without FedLPP)
    init: Adapter  # the LoRA init every party derives from the shared seed
    tokenizer: PreTrainedTokenizerBase


def prepare(config: RunConfig) -> Simulation:
    """Load data, model and LoRA; partition clients; plan privacy (refusing an overspend)."""
    task = data.load_task(config.data, config.seed)
    train_rows, eval_rows = data.split(task, config.data.eval_fraction, config.data.max_eval,
                                       config.seed)
    parts = data.partition(train_rows, config.data, config.federation.num_clients, config.seed)
    plan = make_plan(config, [len(p) for p in parts])  # before loading the model: fail fast
    rule = build_rule(config)
    tokenizer = load_tokenizer(config.model.name)
    q = config.quantization
    general = data.general_texts(q.general_text, q.general_examples, tokenizer,
                                 config.data.max_length) if q.general_text else []
    model = load_model(config.model.name, config.model.dtype, config.model.device)
    full_bytes = full_finetune_bytes(model)
    client_model, bundle = model, None
    if q.base != "none":
        client_model, bundle = distribute(model, tokenizer, q.base, config.model.name,
                                          config.model.dtype, config.model.device)
    central = attach(model, lora_spec_of(config.lora), seed=config.seed)
    handles = central if bundle is None else attach(client_model, lora_spec_of(config.lora),
                                                    seed=config.seed)
    ranks = tuple(client.rank_of(config, cid) for cid in range(len(parts)))
    sites = [client.Site(cid, data.tokenize(part, task, tokenizer, config.data.max_length),
                         client.spec_for(config, rule, plan, ranks[cid]))
             for cid, part in enumerate(parts)]
    eval_examples = data.tokenize(eval_rows, task, tokenizer, config.data.max_length)
    signal = predicted_signal(plan, released_coordinates(read_adapter(handles), rule.trains_a),
                              config.federation)
    server = Server(rule, plan, ranks, task, eval_examples, full_bytes, signal, bundle, general)
    return Simulation(config, server, sites, handles, central, read_adapter(handles), tokenizer)


def run(config: RunConfig, out: Path | str, progress=None, overwrite: bool = False) -> dict:
    """Run the whole federated fine-tune; write the run directory; return the summary."""
    started, out = time.time(), Path(out)
    check_target(out, overwrite)  # refuse an existing run before any work
    sim = prepare(config)  # an overspending plan refuses here: nothing written
    files = RunDir.create(out, to_toml(config), overwrite)
    server, plan, seed = sim.server, sim.server.plan, config.seed
    ledger = plan.new_ledger()
    global_adapter = sim.init
    zero_shot = result = _evaluate(sim, global_adapter)
    files.log_round(_row(sim, 0, result, {}, {}, 0.0, ledger, {},
                         _model_privacy(sim, global_adapter, result)))
    for round_ in range(1, config.federation.rounds + 1):
        t0 = time.time()
        ids = protocol.select_clients(plan, config.federation, seed, round_)
        protocol.check_budget(ledger, plan, ids)
        protocol.spend(ledger, plan, ids)  # before any release: a crash can only overcount
        spent = _ledger_dict(ledger)  # the round's whole spend: nothing is recorded after this
        files.save_ledger(spent)
        uplinks, traffic = {}, {}
        for cid in progress.clients(round_, ids) if progress else ids:
            down, down_bytes = _send_down(sim, global_adapter, server.ranks[cid])
            sent_up, up_bytes = protocol.transmit(client.run_round(
                sim.handles, sim.init, sim.sites[cid], down, seed, round_,
                sim.tokenizer.pad_token_id, progress.step if progress else None))
            up = codec.unpack_update(sent_up, config.quantization.uplink_bits, down)
            protocol.check_uplink(cid, down, up, plan)
            uplinks[cid], traffic[cid] = up, records.Traffic(up=up_bytes, down=down_bytes)
        global_adapter, diagnostics = protocol.aggregate(
            server.rule, plan, global_adapter, list(uplinks.values()),
            seeded_generator(seed, round_, "server", "noise"))
        due = round_ % config.federation.eval_every == 0 or round_ == config.federation.rounds
        result = _evaluate(sim, global_adapter) if due else None
        files.log_round(_row(sim, round_, result, uplinks, traffic, time.time() - t0, ledger,
                             diagnostics,
                             _model_privacy(sim, global_adapter, result) if due else None))
        files.checkpoint(round_, flatten(global_adapter), spent)
        if progress:
            progress.round_done(round_, result,
                                ledger.epsilon(accountant=plan.accountant) if ledger else None)
    assert result is not None  # the last round is always evaluated
    return _finish(sim, files, global_adapter, ledger, zero_shot, result, time.time() - started)


def _send_down(sim: Simulation, adapter: Adapter, rank: int | None) -> tuple[protocol.Payload, int]:
    """Send ``adapter`` to a rank-``rank`` client over the in-process wire, encoded by
    ``quantization.adapter``: return the payload the client decodes and trains from, and the
    bytes that crossed."""
    arrived, size = protocol.transmit(codec.pack_adapter(
        protocol.downlink(sim.server.rule, adapter, rank), sim.config.quantization.adapter))
    return codec.unpack_adapter(arrived), size


def _evaluate(sim: Simulation, adapter: Adapter) -> EvalResult:
    """Score the central model: the server's base (full precision) with ``adapter``."""
    write_adapter(sim.central, adapter)
    return evaluate(sim.central.model, sim.server.eval_examples, sim.server.task, sim.tokenizer)


def _model_privacy(sim: Simulation, adapter: Adapter, central: EvalResult) -> dict | None:
    """Return the model-privacy scores of this global adapter (None without FedLPP).

    central: the server's base + the global adapter (``central`` holds its task scores,
    already computed); client_visible: the base a client holds (the quantized bundle) + the
    adapter as a client rebuilds it from the downlink (as quantized on the wire). Each with the
    task's accuracy and answer loss, and the perplexity of the general text (when configured).
    Before any training the adapter is zero, so the round-0 client_visible scores are the
    client's base alone.
    """
    config, server = sim.config, sim.server
    if server.bundle is None and config.quantization.adapter == "none":
        return None
    visible = protocol.client_start(_send_down(sim, adapter, None)[0], sim.init,
                                    server.rule.trains_a)
    return {"central": _scores(sim, sim.central, adapter, central),
            "client_visible": _scores(sim, sim.handles, visible, None)}


def _scores(sim: Simulation, handles: LoraHandles, adapter: Adapter,
            task: EvalResult | None) -> dict:
    server = sim.server
    write_adapter(handles, adapter)
    if task is None:
        task = evaluate(handles.model, server.eval_examples, server.task, sim.tokenizer)
    general = evaluate(handles.model, server.general, data.GENERAL_TEXT,
                       sim.tokenizer) if server.general else None
    return {"accuracy": task.accuracy, "macro_f1": task.macro_f1, "loss": task.loss,
            "general_perplexity": None if general is None else general.perplexity}


def _ledger_dict(ledger: PrivacyLedger | None) -> dict | None:
    return None if ledger is None else ledger.to_dict()


def _row(sim: Simulation, round_: int, result: EvalResult | None, uplinks: dict[int, protocol.Payload],
         traffic: dict[int, records.Traffic], seconds: float, ledger: PrivacyLedger | None,
         diagnostics: dict[str, float], model_privacy: dict | None) -> dict:
    server = sim.server
    rejected = [cid for cid, u in uplinks.items() if not protocol.is_finite(u)]
    losses = [u.meta["train_loss"] for u in uplinks.values() if "train_loss" in u.meta]
    epsilon = ledger.epsilon(accountant=server.plan.accountant) if ledger else None
    row = records.round_row(round_, result, traffic, rejected, losses, seconds, epsilon,
                            server.rule.name, server.rule.diagnostic, diagnostics,
                            server.full_model_bytes, server.plan)
    if model_privacy is not None:  # scores of public and held-out text only: nothing per client
        row["model_privacy"] = model_privacy
    return row


def _finish(sim: Simulation, files: RunDir, adapter: Adapter, ledger: PrivacyLedger | None,
            zero_shot: EvalResult, final: EvalResult, wall: float) -> dict:
    """Save the adapter in PEFT format, the ledger, summary.json and report.png."""
    config, server = sim.config, sim.server
    save_peft(sim.central, adapter, files.adapter_dir)  # for the server's base
    privacy = None if ledger is None else records.privacy_summary(
        server.plan, ledger.epsilon(accountant="pld"), ledger.epsilon(accountant="rdp"),
        server.signal)
    fed = config.federation
    comm = records.communication(files.rows, server.plan, fed.rounds, fed.num_clients,
                                 fed.per_round, *_mean_transfer_bytes(sim),
                                 server.full_model_bytes,
                                 None if server.bundle is None else server.bundle.total_bytes)
    summary = records.summary(
        server.task.name, server.task.labels, config.model.name,
        majority_share([e.label for e in server.eval_examples]), zero_shot, final,
        config.federation.rounds, server.rule.name, privacy, comm,
        None if server.plan.private else wall)  # the duration grows with private batch sizes
    marked = [r["model_privacy"] for r in files.rows if "model_privacy" in r]
    if marked:
        summary["model_privacy"] = records.model_privacy_summary(
            config.quantization, server.bundle, marked[0], marked[-1])
    task_meta = {"task": server.task.name, "kind": server.task.kind,
                 "labels": list(server.task.labels), "instruction": server.task.instruction,
                 "model": config.model.name, "max_length": config.data.max_length}
    files.finish(summary, _ledger_dict(ledger), task_meta, hide_times=server.plan.private)
    return summary


def _mean_transfer_bytes(sim: Simulation) -> tuple[float, float]:
    """Mean over all clients of one uplink's and one downlink's size, as encoded on the wire:
    shapes only, so it reveals no participation (a private uplink, decoded, has the downlink's
    tensors and nothing beside them, see ``check_uplink``; encoded, their codes and scales)."""
    q = sim.config.quantization
    sizes = {rank: codec.encoded_sizes(protocol.downlink(sim.server.rule, sim.init, rank),
                                       q.adapter, q.uplink_bits)
             for rank in set(sim.server.ranks)}
    n = len(sim.server.ranks)
    return (sum(sizes[r][0] for r in sim.server.ranks) / n,
            sum(sizes[r][1] for r in sim.server.ranks) / n)
