"""The round loop of both runtimes (``run_rounds``), over the protocol and a ``Transport``: in
process (``simulation.InProcess``) or Flower (``flower.server_app.FlowerTransport``); and where a
killed run starts again (``resume_point``, ``Start``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from privlora import data, protocol, records, uplink
from privlora.config import RunConfig, config_from_toml, load_config, refuse_changes, to_toml
from privlora.errors import ConfigError, InvalidUpdate, RoundFailed
from privlora.evaluate import PROGRESS_MARGIN, EvalResult, evaluate, majority_share, progress_margin
from privlora.lm import OffsetModel, causal_lm
from privlora.lora import (
    Adapter,
    flatten,
    save_peft,
    unflatten,
    write_adapter,
)
from privlora.models import weights_dtype
from privlora.privacy.ledger import PrivacyLedger
from privlora.privacy.mechanisms import seeded_generator
from privlora.privacy.plan import PrivacyPlan
from privlora.privacy.signal import agreement as update_agreement
from privlora.quantization import codec, correction
from privlora.run_dir import (
    Checkpoint,
    RunDir,
    checkpoint_tensors,
    last_checkpoint,
)
from privlora.server import ServerState

# Messages that stay with the party that logs them: never written to the run directory.
local_log = logging.getLogger("privlora.local")


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
    quiet: int = 0  # consecutive rounds that did not beat their floor (``progress_margin``)
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


def run_rounds(state: ServerState, transport: Transport, out: Path | str, progress=None,
               overwrite: bool = False, start: Start | None = None) -> dict:
    """The round loop of both runtimes, over the protocol; write the run directory.

    ``start`` continues a killed run from its last checkpoint (``resume_point``): the ledger
    goes on from what was charged, including the round that was cut off. With reproducible noise
    a repeated round releases exactly what it released before (every draw is seeded by the run
    seed, the round and the client), which reveals nothing new, so the parties charged for it
    are not charged again; with the OS CSPRNG the repeat is a fresh release and is charged again.
    """
    started, out, config = time.time(), Path(out), state.config
    server, plan, seed = state.server, state.server.plan, config.seed
    start = start or Start()
    if start.files is None:
        files, ledger, global_adapter = RunDir.create(out, to_toml(config), overwrite), \
            plan.new_ledger(), state.init
        zero_shot = result = _evaluate(state, global_adapter)  # before training: nothing to fit
        files.log_round(_record(state, 0, result, ledger, model_privacy=_model_privacy(
            state, global_adapter, global_adapter, result)))
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
    served = None  # the adapter the server serves, fitted when a round is evaluated
    quiet, patience = start.quiet, config.federation.stop_on_noise
    majority = majority_share([e.label for e in server.eval_examples])
    previous = None  # the last round's global update (a resumed run's, from its checkpoints)
    if start.files is not None and start.adapter is not None:
        previous = _flat_update(start.before or state.init, start.adapter)
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
        downs = {cid: _encode_down(state, global_adapter, server.ranks[cid]) for cid in ids}
        replies = transport.exchange(round_, downs, start.run_id)
        uplinks, traffic, refused = _accept(state, round_, ids, downs, replies)
        _check_quorum(config.federation.min_clients, round_, ids, uplinks)
        before = global_adapter
        global_adapter, diagnostics = protocol.aggregate(
            server.rule, plan, global_adapter, list(uplinks.values()),
            seeded_generator(seed, round_, "server", "noise"))
        update = _flat_update(before, global_adapter)  # a diagnostic, published per round
        agreement = None if previous is None else update_agreement(previous, update)
        previous = update
        # stopping on no progress needs every round evaluated (the server's own eval set and
        # the released model: no privacy cost)
        due = round_ % config.federation.eval_every == 0 or round_ == config.federation.rounds \
            or bool(patience)
        if due:
            served = _served_adapter(state, global_adapter, round_)
            result = _evaluate(state, served)
        margin = progress_margin(zero_shot, result, majority) if patience else math.inf
        quiet = quiet + 1 if margin <= PROGRESS_MARGIN else 0
        stop = bool(patience) and quiet >= patience
        if stop:
            local_log.warning("server: round %d: the model has beaten its floor (zero-shot or "
                              "the majority label) on the eval set by no more than %.0f standard "
                              "errors for %d rounds (federation.stop_on_noise); stopping here",
                              round_, PROGRESS_MARGIN, quiet)
        files.log_round(_record(
            state, round_, result if due else None, ledger, uplinks=uplinks, traffic=traffic,
            rejected=refused, seconds=time.time() - t0, diagnostics=diagnostics,
            model_privacy=_model_privacy(state, global_adapter, served, result) if due else None,
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
    if served is None:  # a resumed run with no round left to run
        served = _served_adapter(state, global_adapter, files.rows[-1]["round"])
    return _finish(state, files, served, ledger, zero_shot, result, wall)


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


def _accept(state: ServerState, round_: int, ids: list[int], downs: dict[int, protocol.Payload],
            replies: dict[int, tuple[protocol.Payload, int] | str]
            ) -> tuple[dict[int, protocol.Payload], dict[int, records.Traffic], list[int]]:
    """Check every reply (``uplink.accept``); return the accepted updates in client order, the
    bytes each client moved, and the ids that sent nothing or a refused update. Why each was
    left out goes to the server's local log only."""
    q = state.config.quantization
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
                                         state.server.plan, q.adapter, q.uplink_bits)
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


def _encode_down(state: ServerState, adapter: Adapter, rank: int | None) -> protocol.Payload:
    """Return what a rank-``rank`` client is sent: the downlink encoded by
    ``quantization.adapter`` (``codec.unpack_adapter`` gives what the client trains from)."""
    return codec.pack_adapter(protocol.downlink(state.server.rule, adapter, rank),
                              state.config.quantization.adapter)


def _served_adapter(state: ServerState, adapter: Adapter, round_: int) -> Adapter:
    """Return the adapter the server serves on its base: the global one, or under
    ``quantization.transfer = "distill"`` the one it fits on public text to the clients' model
    (the clients' base + the global adapter as sent; ``quantization/correction.py``). Uses no
    client data: the global adapter is already released, the text is public."""
    q, server = state.config.quantization, state.server
    if not q.distills:
        return adapter
    write_adapter(state.handles, _visible(state, adapter))
    columns = correction.label_columns(server.task.labels, state.tokenizer)
    pad = state.tokenizer.pad_token_id
    teacher = correction.targets(state.handles.model, server.public, columns, pad)
    how = correction.Distillation(q.distill_steps, q.distill_lr, correction.BATCH, columns)
    return correction.distill(state.central, adapter, server.public, teacher, how, pad,
                              seeded_generator(state.config.seed, round_, "server", "distill"))


def _visible(state: ServerState, adapter: Adapter) -> Adapter:
    """Return the global adapter as a client rebuilds it from the downlink (as quantized on
    the wire)."""
    sent = protocol.transmit(_encode_down(state, adapter, None))[0]
    return protocol.client_start(codec.unpack_adapter(sent), state.init,
                                 state.server.rule.trains_a)


def _evaluate(state: ServerState, adapter: Adapter) -> EvalResult:
    """Score the central model: the server's base (full precision) with ``adapter`` (the served
    one), or under ``quantization.transfer = "logits"`` its base with the adapter's offset
    (``OffsetModel``)."""
    return evaluate(_served(state, adapter), state.server.eval_examples, state.server.task,
                    state.tokenizer)


def _served(state: ServerState, adapter: Adapter):
    """Return the model the server serves with the global ``adapter`` written where it acts."""
    write_adapter(state.central, adapter)
    if not state.config.quantization.serves_logits:
        return state.central.model
    write_adapter(state.handles, adapter)  # the server's own (full-precision) factors
    return OffsetModel(state.central.model, state.handles.model)


def _model_privacy(state: ServerState, adapter: Adapter, served: Adapter,
                   central: EvalResult) -> dict | None:
    """Return the model-privacy scores of this global adapter (None without FedLPP).

    central: the model the server serves (``_served`` of ``served``: its base + the served
    adapter, or the adapter's offset; ``central`` holds its task scores, already computed);
    client_visible: the base a client holds (the quantized bundle) + the adapter as a client
    rebuilds it from the downlink (as quantized on the wire). Each with the task's accuracy and
    answer loss, and the perplexity of the general text (when configured). Under ``transfer =
    "logits"`` or ``"distill"`` also adapter_on_server_base: the server's base + the global
    adapter itself. Before any training the adapter is zero, so the round-0 client_visible
    scores are the client's base alone.
    """
    config, server = state.config, state.server
    if server.bundle is None and config.quantization.adapter == "none":
        return None
    scores = {"central": _scores(state, _served(state, served), central)}
    if config.quantization.serves_logits or config.quantization.distills:
        write_adapter(state.central, adapter)
        scores["adapter_on_server_base"] = _scores(state, state.central.model, None)
    write_adapter(state.handles, _visible(state, adapter))
    return {**scores, "client_visible": _scores(state, state.handles.model, None)}


def _scores(state: ServerState, model, task: EvalResult | None) -> dict:
    """Task accuracy and answer loss (``task`` when already computed) and the general-text
    perplexity of ``model``, whose adapter is already written."""
    server = state.server
    if task is None:
        task = evaluate(model, server.eval_examples, server.task, state.tokenizer)
    general = evaluate(model, server.general, data.GENERAL_TEXT,
                       state.tokenizer) if server.general else None
    return {"accuracy": task.accuracy, "macro_f1": task.macro_f1, "loss": task.loss,
            "general_perplexity": None if general is None else general.perplexity}


def _ledger_dict(ledger: PrivacyLedger | None) -> dict | None:
    return None if ledger is None else ledger.to_dict()


def _record(state: ServerState, round_: int, result: EvalResult | None,
            ledger: PrivacyLedger | None, *, uplinks: dict[int, protocol.Payload] | None = None,
            traffic: dict[int, records.Traffic] | None = None, rejected: list[int] | None = None,
            seconds: float = 0.0, diagnostics: dict[str, float] | None = None,
            model_privacy: dict | None = None, update_agreement: float | None = None) -> dict:
    """Return the round's metrics.jsonl line (round 0: the zero-shot evaluation alone)."""
    server = state.server
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


def _finish(state: ServerState, files: RunDir, adapter: Adapter, ledger: PrivacyLedger | None,
            zero_shot: EvalResult, final: EvalResult, wall: float) -> dict:
    """Save the served ``adapter`` in PEFT format, the ledger, summary.json and report.png."""
    config, server = state.config, state.server
    save_peft(state.central, adapter, files.adapter_dir)  # for the server's base
    privacy = None if ledger is None else records.privacy_summary(
        server.plan, ledger.epsilon(accountant="pld"), ledger.epsilon(accountant="rdp"),
        server.signal)
    fed = config.federation
    rounds = files.rows[-1]["round"]  # below federation.rounds when stopped on noise
    comm = records.communication(files.rows, server.plan, rounds, fed.num_clients,
                                 fed.per_round, *_mean_transfer_bytes(state),
                                 server.full_model_bytes,
                                 None if server.bundle is None else server.bundle.total_bytes)
    marked = [r["model_privacy"] for r in files.rows if "model_privacy" in r]
    summary = records.Summary(
        task=server.task.name, labels=server.task.labels, model=config.model.name,
        model_dtype=weights_dtype(causal_lm(state.central.model)),
        majority=majority_share([e.label for e in server.eval_examples]),
        zero_shot=zero_shot, final=final, rounds=rounds, rule=server.rule.name,
        privacy=privacy, communication=comm,
        wall_seconds=None if server.plan.private else wall,  # grows with private batch sizes
        trained_loss=config.train.loss,
        rounds_planned=fed.rounds if fed.stop_on_noise else None,
        model_privacy=records.model_privacy_summary(
            config.quantization, server.bundle, marked[0], marked[-1]) if marked else None,
    ).published()
    task_meta = {**data.task_meta(server.task), "model": config.model.name,
                 "max_length": config.data.max_length}
    files.finish(summary, _ledger_dict(ledger), task_meta, hide_times=server.plan.private)
    return summary


def _mean_transfer_bytes(state: ServerState) -> tuple[float, float]:
    """Mean over all clients of one uplink's and one downlink's size, as encoded on the wire:
    shapes only, so it reveals no participation (a private uplink, decoded, has the downlink's
    tensors and nothing beside them, see ``check_uplink``; encoded, their codes and scales)."""
    q = state.config.quantization
    sizes = {rank: codec.encoded_sizes(protocol.downlink(state.server.rule, state.init, rank),
                                       q.adapter, q.uplink_bits)
             for rank in set(state.server.ranks)}
    n = len(state.server.ranks)
    return (sum(sizes[r][0] for r in state.server.ranks) / n,
            sum(sizes[r][1] for r in state.server.ranks) / n)
