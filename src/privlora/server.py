"""What the server holds and how it is built, the same in both runtimes: the rule, the privacy
plan (checked before any model loads), the clients' ranks, the held-out eval set, and the models
(the server's full precision; the clients' base, quantized under FedLPP). The round loop is
``rounds.run_rounds``; the in-process runtime, which adds the sites, is ``simulation``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from privlora import client, data
from privlora.communication import full_finetune_bytes
from privlora.config import RunConfig
from privlora.errors import ConfigError
from privlora.lora import (
    Adapter,
    LoraHandles,
    attach,
    read_adapter,
    released_coordinates,
)
from privlora.lora import spec_of as lora_spec_of
from privlora.models import load_model, load_tokenizer
from privlora.privacy import recipe
from privlora.privacy.plan import PrivacyPlan, make_plan, predicted_signal
from privlora.privacy.signal import NoiseToSignal
from privlora.quantization import correction
from privlora.quantization.bins import BinNoise, bin_noise_for
from privlora.quantization.bundle import Manifest, distribute
from privlora.rules import Rule, build_rule


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
    public: list[data.Example]  # public prompts for transfer = "distill" ([] = not distilled)


@dataclass
class ServerState:
    """What the round loop runs on: the config, what the server holds, and the models: the
    server's full-precision one (``central``) and the clients' base (``handles``, the
    dequantized bundle under FedLPP), both with LoRA attached."""

    config: RunConfig
    server: Server
    handles: LoraHandles  # the clients' model: the dequantized bundle under FedLPP
    central: LoraHandles  # the server's full-precision model (``handles`` itself without FedLPP)
    init: Adapter  # the LoRA init every party derives from the shared seed
    tokenizer: PreTrainedTokenizerBase
    base_noise: BinNoise | None = None  # quantization.base_noise = "bin": the bundle's bins


def load_rows(config: RunConfig) -> tuple[data.Task, list[dict], list[dict]]:
    """Return the task and its (train, eval) rows: the split every runtime makes the same way."""
    task = data.load_task(config.data, config.seed)
    train_rows, eval_rows = data.split(task, config.data.eval_fraction, config.data.max_eval,
                                       config.seed)
    return task, train_rows, eval_rows


def prepare_server(config: RunConfig, task: data.Task, eval_rows: list[dict],
                   client_sizes: list[int] | None) -> ServerState:
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
    public = []
    if q.distills:  # refused now, before any model loads: a generation task, shared first tokens
        public = data.public_prompts(q.public_text, q.public_examples, task, tokenizer,
                                     config.data.max_length)
        correction.label_columns(task.labels, tokenizer)
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
    server = Server(rule, plan, ranks, task, eval_examples, full_bytes, signal, bundle, general,
                    public)
    return ServerState(config, server, handles, central, read_adapter(handles), tokenizer,
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
