"""The in-process simulation: the round loop over the protocol, one base model for every client.

``run`` calls only the round protocol (``privlora.protocol``), ``client.run_round`` and
evaluation. Every payload crosses an in-process wire as bytes, exactly as it would cross the
network, and a client starts from what arrived. Only LoRA tensors are per client (loaded into
the shared PEFT model for a client's update), so memory does not grow with the clients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from privlora import client, data, protocol, records, uplink
from privlora.communication import full_finetune_bytes
from privlora.config import RunConfig, config_from_toml, load_config, refuse_changes, to_toml
from privlora.errors import ConfigError, InvalidUpdate, RoundFailed
from privlora.evaluate import EvalResult, evaluate, majority_share, training_label_tokens
from privlora.lm import OffsetModel
from privlora.lora import (
    Adapter,
    LoraHandles,
    attach,
    flatten,
    read_adapter,
    released_coordinates,
    save_peft,
    unflatten,
    write_adapter,
)
from privlora.lora import spec_of as lora_spec_of
from privlora.models import load_model, load_tokenizer
from privlora.privacy import recipe
from privlora.privacy.ledger import PrivacyLedger
from privlora.privacy.mechanisms import seeded_generator
from privlora.privacy.plan import PrivacyPlan, make_plan, predicted_signal
from privlora.privacy.signal import NOISE_AGREEMENT, NoiseToSignal
from privlora.privacy.signal import agreement as update_agreement
from privlora.privacy.site import SiteBudget, SitePolicy, SiteRefused
from privlora.quantization import codec
from privlora.quantization.bins import BinNoise, bin_noise_for
from privlora.quantization.bundle import Manifest, distribute
from privlora.rules import Rule, build_rule
from privlora.run_dir import (
    Checkpoint,
    RunDir,
    check_target,
    checkpoint_tensors,
    last_checkpoint,
)

# Messages that stay with the party that logs them: never written to the run directory.
local_log = logging.getLogger("privlora.local")


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
    sites: list[client.Site]  # [] on a deployed server: the sites hold their own
    handles: LoraHandles  # the clients' model: the dequantized bundle under FedLPP
    central: LoraHandles  # the server's full-precision model (``handles`` itself without FedLPP)
    init: Adapter  # the LoRA init every party derives from the shared seed
    tokenizer: PreTrainedTokenizerBase
    base_noise: BinNoise | None = None  # quantization.base_noise = "bin": the bundle's bins


def prepare(config: RunConfig) -> Simulation:
    """Load data, model and LoRA; partition clients; plan privacy (refusing an overspend)."""
    config = recipe.resolve(config).config  # privacy.recipe = "auto": once, before any data
    task, train_rows, eval_rows = load_rows(config)
    parts = data.partition(train_rows, config.data, config.federation.num_clients, config.seed)
    sim = prepare_server(config, task, eval_rows, [len(p) for p in parts])
    labels = training_label_tokens(task, sim.tokenizer, config.train.label_only)
    sim.sites = [client.Site(cid, data.tokenize(part, task, sim.tokenizer, config.data.max_length),
                             client.spec_for(config, sim.server.rule, sim.server.plan,
                                             sim.server.ranks[cid], labels, sim.base_noise))
                 for cid, part in enumerate(parts)]
    return sim


def load_rows(config: RunConfig) -> tuple[data.Task, list[dict], list[dict]]:
    """Return the task and its (train, eval) rows: the split every runtime makes the same way."""
    task = data.load_task(config.data, config.seed)
    train_rows, eval_rows = data.split(task, config.data.eval_fraction, config.data.max_eval,
                                       config.seed)
    return task, train_rows, eval_rows


def prepare_server(config: RunConfig, task: data.Task, eval_rows: list[dict],
                   client_sizes: list[int] | None) -> Simulation:
    """Build what the server holds, without any site: plan (checked against ``client_sizes``
    where the server knows them; a deployed server does not, and each site checks its own),
    rule, models (the clients' base: the quantized bundle under FedLPP) and the eval set."""
    config = recipe.resolve(config).config  # a no-op once resolved (its keys are then fixed)
    plan = make_plan(config, client_sizes)  # before loading the model: fail fast
    rule = build_rule(config)
    tokenizer = load_tokenizer(config.model.name)
    q = config.quantization
    general = data.general_texts(q.general_text, q.general_examples, tokenizer,
                                 config.data.max_length) if q.general_text else []
    model = load_model(config.model.name, config.model.dtype, config.model.device)
    full_bytes = full_finetune_bytes(model)
    client_model, bundle, base_noise = model, None, None
    if q.quantized_base:
        client_model, bundle = distribute(model, tokenizer, q.base, config.model.name,
                                          config.model.dtype, config.model.device)
        if q.draws_bins:  # what a site computes from its bundle alone
            base_noise = bin_noise_for(client_model, bundle)
    spec = lora_spec_of(config.lora, model)  # resolved once: the central and clients' models
    central = attach(model, spec, seed=config.seed)
    handles = central if bundle is None else attach(client_model, spec, seed=config.seed)
    ranks = tuple(client.rank_of(config, cid) for cid in range(config.federation.num_clients))
    eval_examples = data.tokenize(eval_rows, task, tokenizer, config.data.max_length)
    signal = predicted_signal(plan, released_coordinates(read_adapter(handles), rule.trains_a),
                              config.federation)
    _refuse_a_run_that_cannot_learn(config, signal)
    server = Server(rule, plan, ranks, task, eval_examples, full_bytes, signal, bundle, general)
    return Simulation(config, server, [], handles, central, read_adapter(handles), tokenizer,
                      base_noise)


def _refuse_a_run_that_cannot_learn(config: RunConfig, signal: NoiseToSignal | None) -> None:
    """With ``federation.stop_on_noise``, refuse before anything is spent a run the plan
    predicts too noisy to learn (the forecast reads the config alone: no privacy cost)."""
    if not config.federation.stop_on_noise or signal is None or \
            signal.verdict != "too noisy to learn":
        return
    raise ConfigError(
        f"the privacy plan predicts this run cannot learn (whole-run noise-to-signal "
        f"{signal.whole_run:.2f}, above 1.0), so it would spend its budget for nothing; to learn, "
        f"change one of: {'; '.join(signal.fixes())} (privlora privacy plan shows them), or set "
        "federation.stop_on_noise = 0 to run it anyway")


class Transport(Protocol):
    """How payloads reach the sites and come back: in process, or over Flower."""

    def reachable(self, ids: list[int]) -> list[int]:
        """Return the ids among ``ids`` that can be sent a round now (the others sit it out)."""
        ...

    def exchange(self, round_: int, downs: dict[int, protocol.Payload], run: str
                 ) -> dict[int, tuple[protocol.Payload, int] | str]:
        """Send each client its encoded downlink for round ``round_`` of run ``run``; return
        each one's encoded uplink as it arrived with its size in bytes (as a payload:
        ``Payload.to_bytes``, the same measure in both runtimes), or why none came (a client
        missing from the result sent nothing)."""
        ...


@dataclass
class InProcess:
    """The simulation's wire: each payload crosses as bytes and the client starts from what
    arrived, one client after another on the shared model."""

    sim: Simulation
    progress: Any = None

    def reachable(self, ids: list[int]) -> list[int]:
        return ids

    def exchange(self, round_: int, downs: dict[int, protocol.Payload], run: str
                 ) -> dict[int, tuple[protocol.Payload, int] | str]:
        sim, progress = self.sim, self.progress
        replies: dict[int, tuple[protocol.Payload, int] | str] = {}
        for cid in progress.clients(round_, list(downs)) if progress else downs:
            arrived = codec.unpack_adapter(protocol.transmit(downs[cid])[0])
            try:
                up = client.run_round(sim.handles, sim.init, sim.sites[cid], arrived,
                                      sim.config.seed, round_, sim.tokenizer.pad_token_id,
                                      progress.step if progress else None, run)
            except SiteRefused as err:  # what a Flower site answers: its reason, no data
                replies[cid] = f"site refused: {err}"
                continue
            replies[cid] = protocol.transmit(up)
        return replies


def with_site_budgets(sim: Simulation, out: Path) -> Simulation:
    """Give each simulated site its owner's policy (``[site]``) and its own ledger file, kept
    in ``site.ledger_dir`` (default ``<out>/sites``) under a key naming its share of the data.

    Why not a digest of the rows, as a Flower site keys its data file: the run directory may be
    published, and a digest of a client's rows would let anyone who knows all but one of them
    test for the last one.
    """
    s, d = sim.config.site, sim.config.data
    policy = SitePolicy(s.max_epsilon, s.delta, s.modes, s.allow_non_private)
    folder = Path(s.ledger_dir) if s.ledger_dir else out / "sites"
    share = json.dumps([d.path, d.partition, d.dirichlet_alpha, d.builtin_examples,
                        d.eval_fraction, d.max_eval, sim.config.federation.num_clients,
                        sim.config.seed])
    sim.sites = [dataclasses.replace(site, budget=SiteBudget(
        policy, folder / f"client-{site.client_id}.json",
        hashlib.sha256(f"{share}:client-{site.client_id}".encode()).hexdigest()))
        for site in sim.sites]
    return sim


def run(config: RunConfig, out: Path | str, progress=None, overwrite: bool = False) -> dict:
    """Run the whole federated fine-tune in process; write the run directory; return the
    summary."""
    check_target(Path(out), overwrite)  # refuse an existing run before any work
    sim = with_site_budgets(prepare(config), Path(out))  # an overspending plan refuses here
    return run_rounds(sim, InProcess(sim, progress), out, progress, overwrite)


def resume(out: Path | str, overrides: Sequence[str] = (), progress=None) -> dict:
    """Continue the killed run in ``out`` from its last complete round (``privlora run
    --resume``); ``overrides`` may change only settings that do not touch privacy."""
    config, start = resume_point(Path(out), overrides)
    sim = with_site_budgets(prepare(start.pinned(config)), Path(out))
    return run_rounds(sim, InProcess(sim, progress), out, progress, start=start)


def resume_point(out: Path, overrides: Sequence[str] = ()) -> tuple[RunConfig, Start]:
    """Read where the run in ``out`` stopped; return its config (with ``overrides``) and the
    loop's starting point. Refuses a directory with no checkpoint, a finished run, or a changed
    privacy-relevant setting (naming it)."""
    saved = out / "config.toml"
    if not saved.is_file():
        raise ConfigError(f"--resume {out}: no config.toml there; give the directory of a run "
                          "that `privlora run` started")
    config = load_config(saved, overrides)
    refuse_changes(config_from_toml(saved.read_text()), config)
    done = last_checkpoint(out)
    if done is None:
        raise ConfigError(f"--resume {out}: the run stopped before its first round completed "
                          "(no checkpoint); start it again with --overwrite")
    if (out / "summary.json").is_file():
        raise ConfigError(f"--resume {out}: the run finished (summary.json is there); nothing "
                          "to resume")
    if done.round > config.federation.rounds:
        raise ConfigError(f"--resume {out}: federation.rounds = {config.federation.rounds} is "
                          f"below the {done.round} rounds already done")
    return config, Start.read(out, done)


@dataclass(frozen=True)
class Start:
    """Where the round loop starts: a new run (round 0), or a resumed one's last round."""

    round: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    files: RunDir | None = None
    adapter: Adapter | None = None  # the global adapter after ``round``
    ledger: dict | None = None  # what the run dir's ledger holds (any charge after ``round``)
    charged: frozenset[str] = frozenset()  # parties already charged for round ``round + 1``
    zero_shot: EvalResult | None = None
    last: EvalResult | None = None
    noise_multiplier: float | None = None  # the run's sigma, as calibrated at its start
    seconds: float | None = None  # wall time so far (kept only without DP)
    quiet: int = 0  # consecutive rounds whose update agreed with the one before like noise
    before: Adapter | None = None  # the global adapter after ``round - 1`` (None: the init)

    @classmethod
    def read(cls, out: Path, done: Checkpoint) -> Start:
        state, top = done.state, out / "ledger.json"
        ledger = json.loads(top.read_text()) if top.is_file() else done.ledger
        return cls(done.round, state["run_id"], RunDir.reopen(out, _rows_until(out, done.round)),
                   unflatten(done.tensors), ledger, _charged_after(done.ledger, ledger),
                   EvalResult(**state["zero_shot"]), EvalResult(**state["last_eval"]),
                   state["noise_multiplier"], state["seconds"], state.get("quiet_rounds", 0),
                   _adapter_after(out, done.round - 1))

    def pinned(self, config: RunConfig) -> RunConfig:
        """Return ``config`` with the run's own sigma, so a resumed plan never recalibrates."""
        if self.noise_multiplier is None:
            return config
        return dataclasses.replace(config, privacy=dataclasses.replace(
            config.privacy, noise_multiplier=self.noise_multiplier))


def _rows_until(out: Path, round_: int) -> list[dict]:
    """Return metrics.jsonl's rows of rounds 0 .. ``round_`` (a line cut by the crash, or a
    row of a round whose checkpoint was not written, is dropped)."""
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # the last line, cut by the crash
        if row["round"] <= round_:
            rows.append(row)
    if [r["round"] for r in rows] != list(range(round_ + 1)):
        raise ConfigError(f"{out}/metrics.jsonl lacks rows of rounds 0 .. {round_}; the run "
                          "directory was changed by hand and cannot be resumed")
    return rows


def _adapter_after(out: Path, round_: int) -> Adapter | None:
    """Return the global adapter the checkpoint of ``round_`` holds (None for round 0)."""
    if round_ < 1:
        return None
    return unflatten(checkpoint_tensors(out, round_))


def _charged_after(checkpointed: dict | None, current: dict | None) -> frozenset[str]:
    """Return the parties with more events in ``current`` than in ``checkpointed``: those
    charged for the round that was cut off (charged before any release, see ``protocol.spend``)."""
    if checkpointed is None or current is None:
        return frozenset()
    before, after = checkpointed["events"], current["events"]
    return frozenset(p for p, events in after.items() if len(events) > len(before.get(p, [])))


def run_rounds(sim: Simulation, transport: Transport, out: Path | str, progress=None,
               overwrite: bool = False, start: Start | None = None) -> dict:
    """The round loop of both runtimes, over the protocol; write the run directory.

    ``start`` continues a killed run from its last checkpoint (``resume_point``): the ledger
    goes on from what was charged, including the round that was cut off. With reproducible noise
    a repeated round releases exactly what it released before (every draw is seeded by the run
    seed, the round and the client), which reveals nothing new, so the parties charged for it
    are not charged again; with the OS CSPRNG the repeat is a fresh release and is charged again.
    """
    started, out, config = time.time(), Path(out), sim.config
    server, plan, seed = sim.server, sim.server.plan, config.seed
    start = start or Start()
    if start.files is None:
        files, ledger, global_adapter = RunDir.create(out, to_toml(config), overwrite), \
            plan.new_ledger(), sim.init
        zero_shot = result = _evaluate(sim, global_adapter)
        files.log_round(_record(sim, 0, result, ledger,
                                model_privacy=_model_privacy(sim, global_adapter, result)))
    else:
        files, global_adapter = start.files, start.adapter
        ledger = None if start.ledger is None else PrivacyLedger.from_dict(start.ledger)
        zero_shot, result = start.zero_shot, start.last
        repeat = start.charged if plan.reproducible else frozenset()
        protocol.check_remaining(ledger, plan, config.federation.rounds - start.round, repeat)
        local_log.warning("server: resuming after round %d of %d", start.round,
                          config.federation.rounds)
        if progress:
            progress.resumed(start.round)
    quiet, patience = start.quiet, config.federation.stop_on_noise
    previous = None  # the last round's global update (a resumed run's, from its checkpoints)
    if start.files is not None and start.adapter is not None:
        previous = _flat_update(start.before or sim.init, start.adapter)
    for round_ in range(start.round + 1, config.federation.rounds + 1):
        if patience and quiet >= patience:
            break  # a resumed run that had stopped on noise before its summary was written
        t0 = time.time()
        selected = protocol.select_clients(plan, config.federation, seed, round_)
        ids = transport.reachable(selected)  # only those sent a round are charged for it
        if len(ids) < len(selected):
            local_log.warning("server: round %d: clients %s unreachable, left out", round_,
                              sorted(set(selected) - set(ids)))
        # a repeated round of reproducible noise releases what it released before: not again
        repeat = start.charged if round_ == start.round + 1 and plan.reproducible else frozenset()
        protocol.check_budget(ledger, plan, ids, repeat)
        protocol.spend(ledger, plan, ids, repeat)  # before any release: a crash can only overcount
        spent = _ledger_dict(ledger)  # the round's whole spend: nothing is recorded after this
        files.save_ledger(spent)
        downs = {cid: _encode_down(sim, global_adapter, server.ranks[cid]) for cid in ids}
        replies = transport.exchange(round_, downs, start.run_id)
        uplinks, traffic, refused = _accept(sim, round_, ids, downs, replies)
        _check_quorum(config.federation.min_clients, round_, ids, uplinks)
        before = global_adapter
        global_adapter, diagnostics = protocol.aggregate(
            server.rule, plan, global_adapter, list(uplinks.values()),
            seeded_generator(seed, round_, "server", "noise"))
        update = _flat_update(before, global_adapter)
        agreement = None if previous is None else update_agreement(previous, update)
        previous = update
        quiet = quiet + 1 if agreement is not None and agreement < NOISE_AGREEMENT else 0
        stop = bool(patience) and quiet >= patience
        if stop:
            local_log.warning("server: round %d: the global update has agreed with the round "
                              "before no more than noise for %d rounds (federation.stop_on_noise)"
                              "; stopping here", round_, quiet)
        due = round_ % config.federation.eval_every == 0 or round_ == config.federation.rounds \
            or stop
        if due:
            result = _evaluate(sim, global_adapter)
        files.log_round(_record(
            sim, round_, result if due else None, ledger, uplinks=uplinks, traffic=traffic,
            rejected=refused, seconds=time.time() - t0, diagnostics=diagnostics,
            model_privacy=_model_privacy(sim, global_adapter, result) if due else None,
            update_agreement=agreement))
        files.checkpoint(round_, flatten(global_adapter), spent, _state(
            start, round_, zero_shot, result, plan,
            None if plan.private else (start.seconds or 0.0) + time.time() - started, quiet))
        if progress:
            progress.round_done(round_, result if due else None,
                                ledger.epsilon(accountant=plan.accountant) if ledger else None)
        if stop:
            break
    wall = (start.seconds or 0.0) + time.time() - started
    return _finish(sim, files, global_adapter, ledger, zero_shot, result, wall)


def _flat_update(before: Adapter, after: Adapter) -> torch.Tensor:
    """Return the round's global update, every factor's change in one flat vector."""
    old, new = flatten(before), flatten(after)
    return torch.cat([(new[name].float() - old[name].float()).reshape(-1) for name in new])


def _state(start: Start, round_: int, zero_shot: EvalResult, last: EvalResult,
           plan: PrivacyPlan, seconds: float | None, quiet: int = 0) -> dict:
    """Return what a checkpoint keeps beside the adapter and the ledger for ``--resume``.

    Nothing else is needed: every other draw (client selection, batches, dropout, noise when
    reproducible) is seeded by (run seed, round, client, purpose), not carried from round to
    round, and local optimizers start afresh each round.
    """
    return {"format": 1, "round": round_, "run_id": start.run_id,
            "zero_shot": dataclasses.asdict(zero_shot), "last_eval": dataclasses.asdict(last),
            "noise_multiplier": getattr(plan, "noise_multiplier", None), "seconds": seconds,
            "quiet_rounds": quiet}


def _accept(sim: Simulation, round_: int, ids: list[int], downs: dict[int, protocol.Payload],
            replies: dict[int, tuple[protocol.Payload, int] | str]
            ) -> tuple[dict[int, protocol.Payload], dict[int, records.Traffic], list[int]]:
    """Check every reply (``uplink.accept``); return the accepted updates in client order, the
    bytes each client moved, and the ids that sent nothing or a refused update. Why each was
    left out goes to the server's local log only."""
    q = sim.config.quantization
    uplinks, traffic, refused = {}, {}, []
    for cid in ids:
        down_bytes = len(downs[cid].to_bytes())
        reply = replies.get(cid, "no reply")
        if isinstance(reply, str):
            local_log.warning("server: round %d: client %d left out: %s", round_, cid, reply)
            refused.append(cid)
            traffic[cid] = records.Traffic(up=0, down=down_bytes)
            continue
        received, size = reply
        traffic[cid] = records.Traffic(up=size, down=down_bytes)
        try:
            uplinks[cid] = uplink.accept(cid, codec.unpack_adapter(downs[cid]), received, size,
                                         sim.server.plan, q.adapter, q.uplink_bits)
        except InvalidUpdate as err:
            local_log.warning("server: round %d: update refused: %s", round_, err)
            refused.append(cid)
    return uplinks, traffic, refused


def _check_quorum(min_clients: int, round_: int, ids: list[int],
                  uplinks: dict[int, protocol.Payload]) -> None:
    """Stop the run when fewer than min(min_clients, selected) updates were accepted."""
    need = min(min_clients, len(ids))
    if len(uplinks) < need:
        raise RoundFailed(
            f"round {round_}: {len(uplinks)} of {len(ids)} clients sent an acceptable update, "
            f"fewer than federation.min_clients = {min_clients}; the server's log says why each "
            "was left out. The run stops here: its directory holds the rounds before this one "
            "and the ledger, which counts this round's spend"
        )


def _encode_down(sim: Simulation, adapter: Adapter, rank: int | None) -> protocol.Payload:
    """Return what a rank-``rank`` client is sent: the downlink encoded by
    ``quantization.adapter`` (``codec.unpack_adapter`` gives what the client trains from)."""
    return codec.pack_adapter(protocol.downlink(sim.server.rule, adapter, rank),
                              sim.config.quantization.adapter)


def _evaluate(sim: Simulation, adapter: Adapter) -> EvalResult:
    """Score the central model: the server's base (full precision) with ``adapter``, or under
    ``quantization.transfer = "logits"`` its base with the adapter's offset (``OffsetModel``)."""
    return evaluate(_served(sim, adapter), sim.server.eval_examples, sim.server.task,
                    sim.tokenizer)


def _served(sim: Simulation, adapter: Adapter):
    """Return the model the server serves with the global ``adapter`` written where it acts."""
    write_adapter(sim.central, adapter)
    if not sim.config.quantization.serves_logits:
        return sim.central.model
    write_adapter(sim.handles, adapter)  # the server's own (full-precision) factors
    return OffsetModel(sim.central.model, sim.handles.model)


def _model_privacy(sim: Simulation, adapter: Adapter, central: EvalResult) -> dict | None:
    """Return the model-privacy scores of this global adapter (None without FedLPP).

    central: the model the server serves (``_served``: its base + the global adapter, or the
    adapter's offset; ``central`` holds its task scores, already computed); client_visible: the
    base a client holds (the quantized bundle) + the adapter as a client rebuilds it from the
    downlink (as quantized on the wire). Each with the task's accuracy and answer loss, and the
    perplexity of the general text (when configured). Under ``transfer = "logits"`` also
    adapter_on_server_base: the server's base + the adapter itself. Before any training the
    adapter is zero, so the round-0 client_visible scores are the client's base alone.
    """
    config, server = sim.config, sim.server
    if server.bundle is None and config.quantization.adapter == "none":
        return None
    scores = {"central": _scores(sim, _served(sim, adapter), central)}
    if config.quantization.serves_logits:  # _served wrote the adapter into central
        scores["adapter_on_server_base"] = _scores(sim, sim.central.model, None)
    sent = protocol.transmit(_encode_down(sim, adapter, None))[0]
    visible = protocol.client_start(codec.unpack_adapter(sent), sim.init, server.rule.trains_a)
    write_adapter(sim.handles, visible)
    return {**scores, "client_visible": _scores(sim, sim.handles.model, None)}


def _scores(sim: Simulation, model, task: EvalResult | None) -> dict:
    """Task accuracy and answer loss (``task`` when already computed) and the general-text
    perplexity of ``model``, whose adapter is already written."""
    server = sim.server
    if task is None:
        task = evaluate(model, server.eval_examples, server.task, sim.tokenizer)
    general = evaluate(model, server.general, data.GENERAL_TEXT,
                       sim.tokenizer) if server.general else None
    return {"accuracy": task.accuracy, "macro_f1": task.macro_f1, "loss": task.loss,
            "general_perplexity": None if general is None else general.perplexity}


def _ledger_dict(ledger: PrivacyLedger | None) -> dict | None:
    return None if ledger is None else ledger.to_dict()


def _record(sim: Simulation, round_: int, result: EvalResult | None,
            ledger: PrivacyLedger | None, *, uplinks: dict[int, protocol.Payload] | None = None,
            traffic: dict[int, records.Traffic] | None = None, rejected: list[int] | None = None,
            seconds: float = 0.0, diagnostics: dict[str, float] | None = None,
            model_privacy: dict | None = None, update_agreement: float | None = None) -> dict:
    """Return the round's metrics.jsonl line (round 0: the zero-shot evaluation alone)."""
    server = sim.server
    return records.RoundRecord(
        round=round_, result=result, traffic=traffic or {}, rejected=rejected or [],
        train_losses=[u.meta["train_loss"] for u in (uplinks or {}).values()
                      if "train_loss" in u.meta],
        seconds=seconds,
        epsilon=ledger.epsilon(accountant=server.plan.accountant) if ledger else None,
        rule=server.rule.name, diagnostic=server.rule.diagnostic, diagnostics=diagnostics or {},
        full_model_bytes=server.full_model_bytes, model_privacy=model_privacy,
        update_agreement=update_agreement,
    ).published(server.plan)


def _finish(sim: Simulation, files: RunDir, adapter: Adapter, ledger: PrivacyLedger | None,
            zero_shot: EvalResult, final: EvalResult, wall: float) -> dict:
    """Save the adapter in PEFT format, the ledger, summary.json and report.png."""
    config, server = sim.config, sim.server
    save_peft(sim.central, adapter, files.adapter_dir)  # for the server's base
    privacy = None if ledger is None else records.privacy_summary(
        server.plan, ledger.epsilon(accountant="pld"), ledger.epsilon(accountant="rdp"),
        server.signal)
    fed = config.federation
    rounds = files.rows[-1]["round"]  # below federation.rounds when stopped on noise
    comm = records.communication(files.rows, server.plan, rounds, fed.num_clients,
                                 fed.per_round, *_mean_transfer_bytes(sim),
                                 server.full_model_bytes,
                                 None if server.bundle is None else server.bundle.total_bytes)
    marked = [r["model_privacy"] for r in files.rows if "model_privacy" in r]
    summary = records.Summary(
        task=server.task.name, labels=server.task.labels, model=config.model.name,
        majority=majority_share([e.label for e in server.eval_examples]),
        zero_shot=zero_shot, final=final, rounds=rounds, rule=server.rule.name,
        privacy=privacy, communication=comm,
        wall_seconds=None if server.plan.private else wall,  # grows with private batch sizes
        trained_loss=config.train.loss,
        rounds_planned=fed.rounds if fed.stop_on_noise else None,
        model_privacy=records.model_privacy_summary(
            config.quantization, server.bundle, marked[0], marked[-1]) if marked else None,
    ).published()
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
