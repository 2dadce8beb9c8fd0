"""The privlora ServerApp: the simulation's round loop (``rounds.run_rounds``) with Flower as the
wire.

Run config (``flwr run APP CONN --run-config '...'``): ``config``, the run's TOML on the server
machine; ``out``, the run directory to write; ``overwrite``; ``resume = true`` continues the
stopped run in ``out`` from its last complete round (its own config; ``config`` is ignored). The sites are the SuperNodes; each
answers a ``query`` with its ``partition-id`` (its client id: 0 .. num_clients - 1, each once)
and its optional ``rank``. Each round every selected site gets one ``train`` message: the run's
config, the task, the round and its downlink as named arrays; it answers with its update.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from privlora import data, protocol, rounds, server, uplink
from privlora.client import rank_of
from privlora.config import RunConfig, load_config, to_toml
from privlora.errors import ConfigError, InvalidUpdate, RoundFailed
from privlora.flower import wire
from privlora.quantization import codec
from privlora.rules import build_rule
from privlora.run_dir import check_target

log = logging.getLogger("privlora.flower")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the whole federated fine-tune over the connected SuperNodes."""
    settings = context.run_config
    try:
        out, overwrite = Path(str(settings["out"])), bool(settings.get("overwrite", False))
        if settings.get("resume", False):  # a restarted ServerApp: go on from the run dir
            config, start = rounds.resume_point(out)
            config = start.pinned(config)
        else:
            config, start = load_config(Path(str(settings["config"]))), rounds.Start()
            check_target(out, overwrite)
        task, _, eval_rows = server.load_rows(config)
        sim = server.prepare_server(config, task, eval_rows, None)
        transport = FlowerTransport(grid, sim)
        sim.server = dataclasses.replace(sim.server, ranks=transport.connect())
        summary = rounds.run_rounds(sim, transport, out, RoundLog(), overwrite, start)
    except Exception as err:  # the reason, on one line, where `flwr log` shows it
        log.error("privlora: run failed: %s: %s", type(err).__name__, err)
        raise
    log.info("privlora: done: accuracy %s, run directory %s", summary.get("final", {}).get(
        "accuracy"), out)


def sent_config(sim: server.ServerState) -> RunConfig:
    """Return the config the sites train by: sigma resolved (calibrated once, here) and no
    target, so a site rebuilds the same mechanisms without any accounting (the server keeps
    the ledger and enforces the budget; a site may cap its own with node-config max-epsilon)."""
    config, plan = sim.config, sim.server.plan
    if not plan.private:
        return config
    return dataclasses.replace(config, privacy=dataclasses.replace(
        config.privacy, noise_multiplier=plan.noise_multiplier, target_epsilon=None))


@dataclass
class RoundLog:
    """Progress for the ServerApp's log (``flwr log``): one line per round."""

    started: float = field(default_factory=time.time)

    def resumed(self, round_: int) -> None:
        log.info("privlora: resumed after round %d", round_)

    def round_done(self, round_: int, result, epsilon: float | None) -> None:
        accuracy = None if result is None else f"{result.accuracy:.3f}"
        spent = "" if epsilon is None else f", epsilon {epsilon:.3f}"
        log.info("privlora: round %d done: accuracy %s%s (%.0f s)", round_, accuracy, spent,
                 time.time() - self.started)


@dataclass
class FlowerTransport:
    """``rounds.Transport`` over a Flower Grid: client id <-> SuperNode, one message each."""

    grid: Grid
    sim: server.ServerState
    nodes: dict[int, int] = field(default_factory=dict)  # client id -> node id

    def connect(self) -> tuple[int | None, ...]:
        """Wait for the federation's SuperNodes, learn each one's client id and rank; return
        the ranks by client id (None = lora.rank)."""
        config = self.sim.config
        n, timeout = config.federation.num_clients, config.federation.connect_timeout
        deadline = time.time() + timeout
        while len(node_ids := list(self.grid.get_node_ids())) < n:
            if time.time() > deadline:
                raise RoundFailed(f"{len(node_ids)} of federation.num_clients = {n} SuperNodes "
                                  f"connected within federation.connect_timeout = {timeout} s; "
                                  "start one SuperNode per site")
            time.sleep(1.0)
        asks = [Message(RecordDict({"ask": ConfigRecord({"site": True})}), dst_node_id=node,
                        message_type="query") for node in node_ids]
        sites: dict[int, tuple[int, int]] = {}
        for reply in exchange(self.grid, asks, timeout).values():
            if reply.has_error():
                raise RoundFailed(f"SuperNode {reply.metadata.src_node_id} did not say which "
                                  f"site it is: {reply.error.reason}")
            site = reply.content["site"]
            sites[reply.metadata.src_node_id] = (int(site["partition-id"]), int(site["rank"]))
        ids = sorted(cid for cid, _ in sites.values())
        if ids != list(range(n)):
            raise ConfigError(f"the SuperNodes' partition-id values are {ids}; federation."
                              f"num_clients = {n} needs 0 .. {n - 1}, each on one SuperNode")
        self.nodes = {cid: node for node, (cid, _) in sites.items()}
        ranks = {cid: rank or rank_of(config, cid) for cid, rank in sites.values()}
        return tuple(_checked_rank(config, cid, ranks[cid]) for cid in range(n))

    def reachable(self, ids: list[int]) -> list[int]:
        online = set(self.grid.get_node_ids())
        return [cid for cid in ids if self.nodes[cid] in online]

    def exchange(self, round_: int, downs: dict[int, protocol.Payload], run_id: str
                 ) -> dict[int, tuple[protocol.Payload, int] | str]:
        sim = self.sim
        run = {"config": to_toml(sent_config(sim)),
               "task": json.dumps(data.task_meta(sim.server.task)),
               "bundle": _bundle_digest(sim), "round": round_, "run": run_id}
        messages, limits = [], []
        for cid, down in downs.items():
            arrays, meta = wire.to_record(down)
            messages.append(Message(
                RecordDict({"down": arrays, "run": ConfigRecord({**run, "client": cid,
                                                                 "meta": meta})}),
                dst_node_id=self.nodes[cid], message_type="train", group_id=str(round_)))
            q = sim.config.quantization
            limits.append(uplink.max_uplink_bytes(codec.unpack_adapter(down), q.adapter,
                                                  q.uplink_bits))
        got = exchange(self.grid, messages, sim.config.federation.round_timeout)
        return {cid: _read_reply(got[k], limit) if k in got else
                "no reply within federation.round_timeout"
                for k, (cid, limit) in enumerate(zip(downs, limits))}


PULL_INTERVAL = 0.25  # seconds between pulls of replies (Grid.send_and_receive waits 3 s)


def exchange(grid: Grid, messages: list[Message], timeout: float) -> dict[int, Message]:
    """Push ``messages`` and pull their replies until all came or ``timeout`` seconds passed;
    return the replies by the index of the message they answer (missing: none came).

    Grid.send_and_receive does the same with a 3 s pause between pulls, which every round paid
    on average 1.5 s of; pulling is one local call to the SuperLink.
    """
    ids = list(grid.push_messages(messages))
    index = {message_id: k for k, message_id in enumerate(ids)}
    waiting, replies = set(ids), {}
    deadline = time.time() + timeout
    sent_to = {message_id: m.metadata.dst_node_id for message_id, m in zip(ids, messages)}
    while waiting and time.time() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            answered = reply.metadata.reply_to_message_id
            if answered in waiting and reply.metadata.src_node_id != sent_to[answered]:
                # the SuperLink routes replies by node; this is a second line of defence
                log.warning("privlora: a reply to node %s's message came from node %s; ignored",
                            sent_to[answered], reply.metadata.src_node_id)
                continue
            if answered in waiting:
                waiting.discard(answered)
                replies[index[answered]] = reply
        if waiting:
            time.sleep(PULL_INTERVAL)
    return replies


def _read_reply(reply: Message, limit: int) -> tuple[protocol.Payload, int] | str:
    """Return the uplink a reply carries and its size as a payload, or why there is none
    (never decoding more than ``limit`` bytes of arrays)."""
    if reply.has_error():
        return f"site error (code {reply.error.code}): {reply.error.reason}"
    try:
        arrays = reply.content["update"]
        if not isinstance(arrays, ArrayRecord):
            return f"malformed reply (its update is a {type(arrays).__name__}, not arrays)"
        size = sum(len(a.data) for a in arrays.values())
        if size > limit:
            return f"{size} bytes of arrays, over the {limit} an update of its downlink takes"
        payload = wire.from_record(arrays, str(reply.content["meta"]["meta"]))
        return payload, len(payload.to_bytes())  # fresh tensors: none share memory
    except (KeyError, TypeError) as err:
        return f"malformed reply ({type(err).__name__}: {err})"
    except InvalidUpdate as err:
        return f"malformed reply ({err})"


def _checked_rank(config: RunConfig, cid: int, rank: int | None) -> int | None:
    if rank is None or rank == config.lora.rank:
        return rank
    if not 1 <= rank <= config.lora.rank:
        raise ConfigError(f"site {cid}: node-config rank = {rank} must be in [1, lora.rank = "
                          f"{config.lora.rank}]")
    if not build_rule(config).mixes_ranks:
        raise ConfigError(f"site {cid} asks for rank {rank} < lora.rank; heterogeneous ranks "
                          "need federation.aggregation = 'exact' (the rule that averages "
                          f"products), not {config.federation.aggregation!r}")
    return rank


def _bundle_digest(sim: server.ServerState) -> str:
    """Return the digest of the FedLPP bundle the sites must hold ("" without one)."""
    bundle = sim.server.bundle
    return "" if bundle is None else bundle.digest
