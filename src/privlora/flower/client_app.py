"""The privlora ClientApp: one site's round (``client.run_round``) behind a Flower SuperNode.

The site's own settings are its SuperNode's ``--node-config``:

    partition-id = 0            this site's client id (0 .. num_clients - 1, each once)
    path = "/data/site0.jsonl"  its training rows (the task's fields; labels among the task's)
    rank = 4                    optional: a lower LoRA rank for this site (aggregation exact/ffa)
    bundle = "/models/q4"       FedLPP: the quantized bundle (``privlora quantize``) it trains on
    max-epsilon = 8.0           the cap on what this data ever spends, over all runs (PLD) ...
    delta = 1e-5                ... at this delta (both required for a private run)
    modes = "sample,local"      the privacy modes it accepts ("client" trusts the server)
    allow-non-private = false   true: also take part in runs without DP (then no cap applies)
    ledger = "/data/site0.ledger.json"  its own ledger (default: beside the data file)

Before every round the site charges its own ledger for what its own mechanism will apply
(``privacy.site``), or refuses; a refusal reaches the server with its reason, which names
the policy and never the data.

Everything else comes with each message: the run's config (sigma already calibrated), the task
and the downlink. A failure is logged in full at the site and reported to the server as its
exception type only, since its text can quote the site's data.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from transformers import PreTrainedTokenizerBase

from privlora import bounded_json, client, data
from privlora.config import RunConfig, config_from_toml
from privlora.errors import BundleError, ConfigError
from privlora.evaluate import training_label_tokens
from privlora.flower import wire
from privlora.lora import Adapter, LoraHandles, attach, read_adapter
from privlora.lora import spec_of as lora_spec_of
from privlora.models import load_model, load_tokenizer
from privlora.privacy.plan import check_site, make_plan
from privlora.privacy.site import SiteBudget, SitePolicy, SiteRefused, fingerprint
from privlora.quantization import codec
from privlora.quantization.bins import bin_noise_for
from privlora.quantization.bundle import load_bundle
from privlora.rules import build_rule

local_log = logging.getLogger("privlora.local")

app = ClientApp()


class SiteError(RuntimeError):
    """What the server learns of a failed round at a site: the exception's type, nothing else."""


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which site this is: its client id and its LoRA rank (0 = the run's)."""
    node = context.node_config
    site = {"partition-id": int(node["partition-id"]), "rank": int(node.get("rank", 0))}
    return Message(RecordDict({"site": ConfigRecord(site)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run this site's round from the downlink; answer with the update."""
    try:
        return _train(msg, context)
    except SiteRefused as err:  # the owner's policy said no: the reason names no data
        local_log.warning("site: refused round %s: %s", msg.content["run"]["round"], err)
        raise SiteError(f"site refused: {err}") from None
    except Exception as err:  # noqa: BLE001  # every failure: its text stays at the site
        local_log.exception("site: the round failed")
        raise SiteError(f"{type(err).__name__} at the site; its SuperNode's log has the "
                        "details") from None


def _train(msg: Message, context: Context) -> Message:
    run, node = msg.content["run"], context.node_config
    cid = int(node["partition-id"])
    if int(run["client"]) != cid:
        raise ConfigError(f"a message for client {run['client']} reached site {cid}")
    site = _site(str(run["config"]), str(run["task"]), str(run["bundle"]),
                 tuple(sorted((str(k), str(v)) for k, v in node.items())))
    if not 1 <= int(run["round"]) <= site.config.federation.rounds:
        raise SiteRefused(f"round {run['round']} is outside the run's federation.rounds = "
                          f"{site.config.federation.rounds}")
    down = codec.unpack_adapter(wire.from_record(msg.content["down"], str(run["meta"])))
    up = client.run_round(site.handles, site.init, site.site, down, site.config.seed,
                          int(run["round"]), site.tokenizer.pad_token_id, run=str(run["run"]))
    arrays, meta = wire.to_record(up)
    return Message(RecordDict({"update": arrays, "meta": ConfigRecord({"meta": meta})}),
                   reply_to=msg)


@dataclass(frozen=True)
class SiteState:
    """What a site builds once per process: its model with LoRA, its examples, its spec."""

    config: RunConfig
    handles: LoraHandles
    init: Adapter
    site: client.Site
    tokenizer: PreTrainedTokenizerBase


@functools.cache
def _site(config_text: str, task_json: str, bundle_digest: str,
          node_items: tuple[tuple[str, str], ...]) -> SiteState:
    """Build the site (cached: a long-lived ClientApp process builds it once)."""
    config = config_from_toml(config_text)
    node = dict(node_items)
    cid = int(node["partition-id"])
    task = data.task_from_meta(bounded_json.loads(task_json))  # sent by the server
    path = Path(node["path"])
    budget = SiteBudget(SitePolicy.from_node_config(node),
                        Path(node.get("ledger", str(path) + ".ledger.json")), fingerprint(path))
    rows = data.site_rows(path, task, config.data)
    plan = make_plan(config, None)  # sigma comes resolved: this only rebuilds the mechanisms
    check_site(config, len(rows))
    tokenizer = load_tokenizer(config.model.name)
    model, manifest = _base_model(config, node.get("bundle", ""), bundle_digest)
    base_noise = None
    if manifest is not None and config.quantization.draws_bins:
        base_noise = bin_noise_for(model, manifest)  # before LoRA wraps it: the bundle's names
    handles = attach(model, lora_spec_of(config.lora, model), seed=config.seed)
    rank = int(node.get("rank", 0)) or client.rank_of(config, cid)
    spec = client.spec_for(config, build_rule(config), plan, rank,
                           training_label_tokens(task, tokenizer, config.train.label_only), base_noise)
    examples = data.tokenize(rows, task, tokenizer, config.data.max_length)
    return SiteState(config, handles, read_adapter(handles),
                     client.Site(cid, examples, spec, budget), tokenizer)


def _base_model(config: RunConfig, bundle: str, digest: str):
    """Return the model this site trains on and its bundle's manifest: the run's base (no
    manifest), or under FedLPP its bundle, which must be the one the server distributed."""
    if not digest:
        return load_model(config.model.name, config.model.dtype, config.model.device), None
    if not bundle:
        raise BundleError("the run distributes a quantized base (quantization.base = "
                          f"{config.quantization.base!r}); give this SuperNode --node-config "
                          "bundle=\"DIR\" naming the bundle the server published")
    model, manifest = load_bundle(bundle, config.model.dtype, config.model.device)
    if manifest.digest != digest:
        raise BundleError(f"bundle {bundle} is not the one the server distributes (digest "
                          f"{manifest.digest[:12]} != {digest[:12]}); fetch it again")
    return model, manifest
