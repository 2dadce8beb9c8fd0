"""The in-process simulation: the server (``server.prepare_server``), the sites with their
shares of the data, and a wire (``InProcess``) over which the round loop (``rounds.run_rounds``)
runs. Every payload crosses the wire as bytes, exactly as it would cross the network, and a
client starts from what arrived. Only LoRA tensors are per client (loaded into the shared PEFT
model for a client's update), so memory does not grow with the clients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privlora import client, data, protocol
from privlora.config import RunConfig
from privlora.evaluate import training_label_tokens
from privlora.privacy import recipe
from privlora.privacy.site import SiteBudget, SitePolicy, SiteRefused
from privlora.quantization import codec
from privlora.rounds import resume_point, run_rounds
from privlora.run_dir import check_target
from privlora.server import ServerState, load_rows, prepare_server


@dataclass
class Simulation(ServerState):
    """The in-process runtime: the server's state, and the sites sharing its base model."""

    sites: list[client.Site] = field(default_factory=list)


def prepare(config: RunConfig) -> Simulation:
    """Load data, model and LoRA; partition clients; plan privacy (refusing an overspend)."""
    config = recipe.resolve(config).config  # privacy.recipe = "auto": once, before any data
    task, train_rows, eval_rows = load_rows(config)
    parts = data.partition(train_rows, config.data, config.federation.num_clients, config.seed)
    sim = Simulation(**vars(prepare_server(config, task, eval_rows, [len(p) for p in parts])))
    labels = training_label_tokens(task, sim.tokenizer, config.train.label_only)
    sim.sites = [client.Site(cid, data.tokenize(part, task, sim.tokenizer, config.data.max_length),
                             client.spec_for(config, sim.server.rule, sim.server.plan,
                                             sim.server.ranks[cid], labels, sim.base_noise))
                 for cid, part in enumerate(parts)]
    return sim


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
