"""One frozen, validated run configuration; loaded from TOML plus ``--set key=value`` overrides.

Every error names the field, the bad value and the fix, so a malformed config never starts a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from privlora.errors import ConfigError

PrivacyMode = Literal["none", "sample", "client", "local"]
Aggregation = Literal["fedavg", "ffa", "exact"]
BaseScheme = Literal["none", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "tq2_0", "nf4"]
AdapterScheme = Literal["none", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1"]
BaseNoise = Literal["none", "bin"]
Transfer = Literal["adapter", "logits", "distill"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "builtin"  # 'builtin', 'tiny-random', a .gguf file, an HF directory or a hub id
    # auto: bfloat16 where the CPU computes it natively (avx512_bf16 or AMX), else float32;
    # nf4: the linear layers' weights in 4 bits (bitsandbytes, QLoRA style), computing as auto
    dtype: Literal["auto", "bfloat16", "float32", "float16", "nf4"] = "auto"
    # auto: CUDA when available, else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # () = the model family's default (privlora.architectures): query + value projections, or
    # the fused query-key-value one (Phi-3 qkv_proj, GPT-2 c_attn, GPT-NeoX query_key_value)
    target_modules: tuple[str, ...] = ()
    client_ranks: tuple[int, ...] = ()  # heterogeneous ranks, cycled over client ids; () = all `rank`
    # adapt only the last k decoder layers (0 = every layer): backward stops below the lowest
    # adapted layer, so a step costs less, and fewer coordinates are released under DP
    last_layers: int = 0


@dataclass(frozen=True)
class DataConfig:
    path: str = "builtin"  # 'builtin' (generated ticket-routing task) or a JSONL file
    # a fixed evaluation file (e.g. SST-2's validation set): all of `path` then trains, and the
    # eval set is the first max_eval rows of this file; "" = hold out eval_fraction of `path`
    eval_path: str = ""
    kind: Literal["auto", "classification", "generation"] = "auto"
    eval_fraction: float = 0.2
    max_eval: int = 200
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    max_length: int = 128
    builtin_examples: int = 1200
    # classification from other fields: each row's text is these fields as "Field: value"
    # paragraphs and its label is `label_field` (PubMedQA: ["question", "context"], "answer");
    # () reads `text` and `label` (or `question` and `answer` for generation) as they are
    text_fields: tuple[str, ...] = ()
    label_field: str = "label"
    # training examples each client holds, as DECLARED by the user (0 = not declared): public,
    # since it is written in the run's config.toml, so give a round figure agreed with the sites,
    # never an exact count read from their data. privacy.recipe = "auto" sizes batches and steps
    # from it (required in sample mode); nothing else reads it
    examples_per_client: int = 0


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = 4
    rounds: int = 5
    clients_per_round: int = 0  # 0 = every client every round (expected count in client DP mode)
    client_fraction: float = 0.0  # or a fraction of num_clients per round (0 = use the count)
    eval_every: int = 1  # evaluate the global adapter every k rounds (and always after the last)

    @property
    def per_round(self) -> int:
        """Return how many clients take part in a round (expected number in client DP mode)."""
        if self.client_fraction > 0:
            return max(1, round(self.client_fraction * self.num_clients))
        return self.clients_per_round or self.num_clients
    aggregation: Aggregation = "fedavg"
    # a round goes on while at least this many of its clients' updates are accepted (fewer
    # clients selected: all of them); a site that drops out or sends a refused update is left out
    min_clients: int = 1
    # stop after this many consecutive rounds whose model, on the server's eval set, beats its
    # floor (zero-shot, or always the most common label) by no more than 2 standard errors
    # (evaluate.progress_margin; every round is then evaluated); it reads only the released,
    # already-noised model and the server's own eval set, so stopping costs no privacy. With DP,
    # a run the plan forecasts too noisy to learn is refused before any spend. 0 = never stop
    stop_on_noise: int = 0
    # deployment (Flower): seconds the server waits for a round's replies, and for the sites to
    # connect at the start
    round_timeout: float = 600.0
    connect_timeout: float = 120.0


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 12
    batch_size: int = 8
    lr: float = 3e-3
    # "constant": train.lr at every local step. "cosine": decays it over the run's
    # federation.rounds x local_steps local steps, lr x (1 + cos(pi x t / T)) / 2 at step t of T,
    # the same at every client (lr_schedule.py). Public, so no privacy cost
    lr_schedule: Literal["constant", "cosine"] = "constant"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.0  # SGD's heavy-ball momentum (reset each round, like Adam's moments)
    weight_decay: float = 0.0
    # "answer": cross-entropy of every answer token over the whole vocabulary (the default).
    # "label" (classification): cross-entropy over the task's label words only, at the first
    # answer position: exactly what eval scores, so a noisy clipped gradient carries only the
    # class signal (the private demo's recipe). The model is then trained to rank the labels,
    # not to stop after one.
    loss: Literal["answer", "label"] = "answer"
    # examples per forward pass: larger batches (DP's hundreds per step) are split into chunks
    # and their (clipped) gradients summed, so memory stays flat; the result is the same
    microbatch: int = 32
    # CPU threads for a client's local update, in both runtimes (restored after it). A CPU's
    # matmuls and reductions split their sums by thread count, so the same seed gives the same
    # adapter only at the same count: pinned (e.g. 1), the simulation and every site agree bit
    # for bit. 0 = torch's default (all cores in the simulation, OMP_NUM_THREADS at a site):
    # the fast default, with which the runtimes agree only to float rounding, which training
    # amplifies (0.018 on SmolLM2 in bf16 after 3 rounds, 1 thread per site against 2)
    threads: int = 0
    # Recompute each decoder layer's activations in the backward instead of keeping them
    # (transformers' gradient checkpointing, non-reentrant): the same gradients for about a
    # third more compute, and activation memory of one layer instead of all. "auto" = on for
    # models of at least models.CHECKPOINT_ABOVE parameters (bench/model_size.py measures why)
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    # privacy.recipe = "auto": the compute budget, in examples processed over the whole run by
    # all clients (rounds x clients per round x local steps x batch). 0 = auto's default:
    # privacy.recipe_steps.PRIVATE_BUDGET example-gradients under DP, two passes over the declared
    # data (at most privacy.recipe_steps.PUBLIC_BUDGET_CAP) without
    max_examples_processed: int = 0
    # privacy.recipe = "auto": the same budget in minutes of training on the machine that
    # resolves the recipe, which times its own local step once on synthetic examples
    # (compute_budget.py) and turns the minutes into max_examples_processed (saved with the
    # other choices). 0 = not set; max_examples_processed, when also set, wins. Timings vary,
    # so for a run that repeats exactly set max_examples_processed (privacy plan prints it)
    max_minutes: float = 0.0

    @property
    def label_only(self) -> bool:
        """Whether the loss is over the label words alone (``loss = "label"``)."""
        return self.loss == "label"


@dataclass(frozen=True)
class PrivacyConfig:
    mode: PrivacyMode = "none"
    noise_multiplier: float | None = None  # sigma: noise std = sigma * sensitivity
    target_epsilon: float | None = None  # calibrate sigma before training instead
    delta: float = 1e-5
    clip: float = 1.0
    sample_rate: float | None = None  # sample mode: Poisson rate of examples per step
    accountant: Literal["pld", "rdp"] = "pld"
    # False (the default): DP noise and privacy sampling come from the OS CSPRNG. True: they are
    # seeded from the run seed, for research; every published file then says the epsilon does
    # not hold against anyone who knows or guesses the seed.
    reproducible_noise: bool = False
    # "manual": the config as written. "auto" (privacy.recipe): before the run, choose what the
    # user did not set (batch and sample rate, steps, rounds, LoRA rank and modules, FFA, lr,
    # the loss) from public, declared quantities only; see privacy/recipe.py
    recipe: Literal["manual", "auto"] = "manual"


@dataclass(frozen=True)
class QuantizationConfig:
    # FedLPP: clients receive the base model quantized (a GGUF bundle, gguf's quantizers) and
    # train on it; the server keeps full precision. "none": clients get the server's model.
    base: BaseScheme = "none"
    adapter: AdapterScheme = "none"  # the global adapter on the downlink, same block schemes
    uplink_bits: int = 0  # 8 or 4: unbiased stochastic rounding of the update (0 = float32)
    # "bin": each local step trains on a fresh draw of every quantized base weight, uniform
    # within its quantization bin (quantization/bins.py), so the adapter fits no one error
    # pattern; computed by each client from its bundle alone. "none": train on the grid.
    base_noise: BaseNoise = "none"
    # How the server serves the clients' adapter on its full-precision base: "adapter", the
    # base plus the LoRA adapter (a standard PEFT adapter); "logits", the base's log-probabilities
    # plus the adapter's change on the quantized base the clients trained on,
    # log p(quantized + adapter) - log p(quantized) (proxy tuning): three forwards per token;
    # "distill", an adapter the server fits on its base to the clients' model's label
    # distribution on public_text (quantization/correction.py; classification tasks)
    transfer: Transfer = "adapter"
    # JSONL of public text in the task's domain ('text', else 'answer'), for transfer = "distill"
    public_text: str = ""
    public_examples: int = 512  # texts read from public_text (its first rows)
    distill_steps: int = 60  # Adam steps of batches of 16 public prompts
    distill_lr: float = 1e-3
    # JSONL of general text the fine-tune does not see (e.g. Dolly answers): the perplexity of
    # the central vs the client-visible model on it is the model-privacy gap; "" = not measured
    general_text: str = ""
    general_examples: int = 64  # texts read from general_text (its first rows)

    @property
    def quantized_base(self) -> bool:
        """Whether clients hold a quantized copy of the base (FedLPP), not the server's."""
        return self.base != "none"

    @property
    def serves_logits(self) -> bool:
        """Whether the server serves the adapter's offset of log-probabilities (proxy tuning)."""
        return self.transfer == "logits"

    @property
    def distills(self) -> bool:
        """Whether the server serves an adapter it fits to the clients' model on public text."""
        return self.transfer == "distill"

    @property
    def draws_bins(self) -> bool:
        """Whether each local step trains on a fresh draw within the quantization bins."""
        return self.base_noise == "bin"


@dataclass(frozen=True)
class SiteSection:
    """What every simulated site's owner allows; a Flower site sets the same in its SuperNode's
    node-config (max-epsilon, delta, modes, allow-non-private, ledger). Each site checks it
    before every round against its own ledger, so `privlora run` shows the refusals a
    deployment would. The defaults take part in any run, with no cap beyond the run's own."""

    max_epsilon: float | None = None  # the site's cap over all runs on its data (needs delta)
    delta: float | None = None  # the delta its epsilon is stated at
    modes: tuple[str, ...] = ("sample", "local", "client")  # client mode trusts the server
    allow_non_private: bool = True
    # where each simulated site keeps its ledger (client-<id>.json); "" = <run dir>/sites
    ledger_dir: str = ""


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    site: SiteSection = field(default_factory=SiteSection)
    # The keys whose values are fixed: those the user set (in the file or with --set), plus
    # those privacy.recipe = "auto" has resolved. Not a setting (no TOML key, not in to_toml,
    # not compared); None for a config built in Python: then every value that differs from its
    # default counts as set (``fixed_keys``)
    explicit: frozenset[str] | None = field(default=None, compare=False, repr=False,
                                            metadata={"internal": True})


def load_config(path: Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a TOML file (or the defaults), apply ``key=value`` overrides, validate, return it."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file; give a TOML file path")
        try:
            raw = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            line = err.object[:err.start].count(b"\n") + 1
            raise ConfigError(f"--config {path}: line {line} is not UTF-8; save the file as "
                              "UTF-8 text") from None
        except OSError as err:
            raise ConfigError(f"--config {path}: cannot be read ({err.strerror}); check the "
                              "file's permissions") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--config {path}: not valid TOML ({err}); fix the syntax") from None
    for item in overrides:
        _apply_override(raw, item)
    return _validated(raw)


def config_from_toml(text: str) -> RunConfig:
    """Parse and validate a config rendered by ``to_toml`` (what a deployed server sends)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"the run config sent by the server is not valid TOML ({err})") from None
    return _validated(raw)


def _validated(raw: dict[str, Any]) -> RunConfig:
    config = _build(RunConfig, raw, prefix="")
    validate(config)
    given = {f"{section}.{key}" for section, body in raw.items() if isinstance(body, dict)
             for key in body}
    return dataclasses.replace(config, explicit=frozenset(
        given | {key for key, value in raw.items() if not isinstance(value, dict)}))


def flat_values(config: RunConfig) -> dict[str, Any]:
    """Return every setting of ``config`` by its key: 'seed', 'lora.rank', ..."""
    found: dict[str, Any] = {}
    for top in _settings(RunConfig):
        value = getattr(config, top.name)
        if not dataclasses.is_dataclass(value):
            found[top.name] = value
            continue
        for f in dataclasses.fields(value):
            found[f"{top.name}.{f.name}"] = getattr(value, f.name)
    return found


def fixed_keys(config: RunConfig) -> frozenset[str]:
    """Return the keys of ``config`` that are fixed (``RunConfig.explicit``); for a config built
    in Python (explicit None), those whose value differs from the default."""
    if config.explicit is not None:
        return config.explicit
    default = flat_values(RunConfig())
    return frozenset(k for k, v in flat_values(config).items() if v != default[k])


def with_values(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """Return ``config`` with ``values`` ({'train.lr': 0.02, ...}) set, validated, and their keys
    added to the fixed ones."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    changed = dataclasses.replace(config, **{
        section: dataclasses.replace(getattr(config, section), **body)
        for section, body in sections.items()})
    validate(changed)
    return dataclasses.replace(changed, explicit=fixed_keys(config) | frozenset(values))


def _settings(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` a user can set (not the internal ``explicit``)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set federation.rounds=3")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word such as sample or q_proj is taken as a string
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
    node[leaf] = value


# Keys that existed in earlier versions, and what replaced them.
_REPLACED = {
    "privacy.secure_rng": "privacy.secure_rng was replaced by privacy.reproducible_noise "
    "(default false: noise from the OS CSPRNG); delete secure_rng, and set "
    "reproducible_noise = true only for research runs that must be replayable",
}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table (section), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _settings(cls)]
    for key in raw:
        if f"{prefix}{key}" in _REPLACED:
            raise ConfigError(_REPLACED[f"{prefix}{key}"])
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {names}"
            raise ConfigError(f"unknown config key {prefix + key!r}; {hint}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {list(get_args(hint))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = next(a for a in get_args(hint) if a is not type(None))
        return _coerce(inner, value, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r} must be a list, e.g. {key} = [...]")
        inner = get_args(hint)[0]
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(
            f"{key} = {value!r} has type {type(value).__name__}; it must be {hint.__name__}"
        )
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r} is not a finite number; give one, e.g. {key} = 1.0")
    if hint is str and any(unicodedata.category(ch) == "Cc" for ch in value):
        # Why: no name, path or module has one, and to_toml (what a server sends its sites)
        # writes strings as they are, where TOML forbids control characters
        raise ConfigError(f"{key} = {value!r} holds a control character (newline, tab, ...); "
                          "remove it")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: RunConfig) -> None:
    """Check value ranges and mode/field consistency; raise ConfigError naming the field."""
    _require(bool(c.model.name), "model.name is empty; give 'builtin', 'tiny-random', a .gguf "
             "file, a Hugging Face directory or a hub id")
    _require(c.lora.rank >= 1, f"lora.rank = {c.lora.rank} must be >= 1")
    _require(c.lora.alpha > 0, f"lora.alpha = {c.lora.alpha} must be > 0")
    _require(0 <= c.lora.dropout < 1, f"lora.dropout = {c.lora.dropout} must be in [0, 1)")
    _require(all(c.lora.target_modules),
             f"lora.target_modules = {list(c.lora.target_modules)} names an empty module; "
             "remove the empty string")
    _require(c.lora.last_layers >= 0,
             f"lora.last_layers = {c.lora.last_layers} must be >= 0 (0 adapts every layer)")
    for r in c.lora.client_ranks:
        _require(1 <= r <= c.lora.rank, f"lora.client_ranks has {r}; each must be in [1, lora.rank]")
    _require(bool(c.data.path), "data.path is empty; give a JSONL file or 'builtin'")
    _require(0 < c.data.eval_fraction < 1, f"data.eval_fraction = {c.data.eval_fraction} not in (0,1)")
    _require(c.data.max_eval >= 1, f"data.max_eval = {c.data.max_eval} must be >= 1")
    _require(c.data.dirichlet_alpha > 0, f"data.dirichlet_alpha = {c.data.dirichlet_alpha} must be > 0")
    _require(c.data.max_length >= 16, f"data.max_length = {c.data.max_length} must be >= 16")
    _require(c.data.builtin_examples >= 20,
             f"data.builtin_examples = {c.data.builtin_examples} must be >= 20")
    _require(not (c.data.text_fields and c.data.path == "builtin"),
             "data.text_fields is set but data.path = 'builtin' (the generated task has its own "
             "fields); remove data.text_fields or point data.path at a JSONL file")
    _require(not (c.data.text_fields and c.data.kind == "generation"),
             "data.text_fields builds classification rows; set data.kind = 'auto' or "
             "'classification', or remove data.text_fields")
    _require("text" not in c.data.text_fields,
             "data.text_fields may not name 'text' (the field it builds); a file with 'text' and "
             "'label' needs no data.text_fields, otherwise rename that field")
    _require(bool(c.data.label_field), "data.label_field must name a field (default 'label')")
    _require(c.data.examples_per_client >= 0,
             f"data.examples_per_client = {c.data.examples_per_client} must be >= 0 (0 = not "
             "declared)")
    _require(c.train.max_examples_processed >= 0,
             f"train.max_examples_processed = {c.train.max_examples_processed} must be >= 0 "
             "(0 = privacy.recipe = 'auto' picks its default)")
    _require(c.train.max_minutes >= 0,
             f"train.max_minutes = {c.train.max_minutes} must be >= 0 (0 = not set)")
    _require(not (c.train.max_minutes and c.privacy.recipe != "auto"),
             f"train.max_minutes = {c.train.max_minutes} is a budget for privacy.recipe = "
             "'auto' to plan within; set privacy.recipe = 'auto', or remove train.max_minutes "
             "and set train.local_steps and federation.rounds yourself")
    _require(not (c.train.max_minutes and c.privacy.mode == "none"
                  and not c.data.examples_per_client),
             "train.max_minutes without DP sizes the steps to data.examples_per_client: declare "
             "it (a public round figure), or remove train.max_minutes")
    _require(not (c.privacy.recipe == "auto" and c.privacy.mode == "sample"
                  and not c.data.examples_per_client),
             "privacy.recipe = 'auto' in sample mode needs data.examples_per_client: declare "
             "how many training examples each client holds (a public round figure agreed with "
             "the sites, e.g. 20000; it is published in the run's config.toml, together with "
             "the sample rate chosen from it, so never copy an exact count from their data)")
    _require(not (c.data.label_field != "label" and not c.data.text_fields),
             f"data.label_field = {c.data.label_field!r} is only read with data.text_fields; "
             "set data.text_fields to the fields that make each row's text")
    _require(0 <= c.train.momentum < 1, f"train.momentum = {c.train.momentum} must be in [0, 1)")
    _require(not (c.train.momentum and c.train.optimizer != "sgd"),
             f"train.momentum = {c.train.momentum} is SGD's; set train.optimizer = 'sgd' or "
             "remove train.momentum (AdamW keeps its own moments)")
    _require(not (c.train.loss == "label" and c.data.kind == "generation"),
             "train.loss = 'label' trains a classifier over the task's labels but data.kind = "
             "'generation'; set train.loss = 'answer'")
    _require(not (c.data.eval_path and c.data.path == "builtin"),
             "data.eval_path is set but data.path = 'builtin' (the generated task holds out its "
             "own eval set); remove data.eval_path or point data.path at a JSONL file")
    f = c.federation
    _require(f.num_clients >= 1, f"federation.num_clients = {f.num_clients} must be >= 1")
    _require(f.rounds >= 1, f"federation.rounds = {f.rounds} must be >= 1")
    _require(f.eval_every >= 1, f"federation.eval_every = {f.eval_every} must be >= 1")
    _require(f.stop_on_noise >= 0,
             f"federation.stop_on_noise = {f.stop_on_noise} must be >= 0 (0 = never stop)")
    _require(
        0 <= f.clients_per_round <= f.num_clients,
        f"federation.clients_per_round = {f.clients_per_round} must be in [0, num_clients]",
    )
    _require(0 <= f.client_fraction <= 1,
             f"federation.client_fraction = {f.client_fraction} must be in [0, 1]")
    _require(not (f.client_fraction and f.clients_per_round),
             "set federation.clients_per_round or federation.client_fraction, not both")
    _require(1 <= f.min_clients <= f.num_clients,
             f"federation.min_clients = {f.min_clients} must be in [1, num_clients]")
    _require(f.round_timeout > 0,
             f"federation.round_timeout = {f.round_timeout} must be > 0 (seconds)")
    _require(f.connect_timeout > 0,
             f"federation.connect_timeout = {f.connect_timeout} must be > 0 (seconds)")
    _require(c.train.local_steps >= 1, f"train.local_steps = {c.train.local_steps} must be >= 1")
    _require(c.train.batch_size >= 1, f"train.batch_size = {c.train.batch_size} must be >= 1")
    _require(c.train.microbatch >= 1, f"train.microbatch = {c.train.microbatch} must be >= 1")
    _require(c.train.threads >= 0,
             f"train.threads = {c.train.threads} must be >= 0 (0 = torch's default)")
    _require(c.train.lr > 0, f"train.lr = {c.train.lr} must be > 0")
    _require(c.train.weight_decay >= 0,
             f"train.weight_decay = {c.train.weight_decay} must be >= 0 (0 = none)")
    if c.lora.client_ranks and f.aggregation == "fedavg":
        raise ConfigError(
            "lora.client_ranks (heterogeneous ranks) cannot be used with federation.aggregation = "
            "'fedavg': averaging factors of different ranks is undefined; use aggregation = 'exact'"
        )
    if c.lora.client_ranks and f.aggregation == "ffa":
        raise ConfigError("lora.client_ranks needs federation.aggregation = 'exact', not 'ffa'")
    _validate_privacy(c.privacy)
    _validate_quantization(c.quantization)
    _require(not (c.model.dtype == "nf4" and c.quantization.quantized_base),
             f"model.dtype = 'nf4' and quantization.base = {c.quantization.base!r} both quantize "
             "the base: FedLPP sends clients its own quantized copy and keeps full precision at "
             "the server; set model.dtype = 'auto' with FedLPP, or quantization.base = 'none'")
    _validate_site(c.site)


def _validate_site(s: SiteSection) -> None:
    from privlora.privacy.site import SitePolicy

    SitePolicy(s.max_epsilon, s.delta, s.modes, s.allow_non_private)  # raises, naming it


def _validate_quantization(q: QuantizationConfig) -> None:
    _require(q.uplink_bits in (0, 4, 8),
             f"quantization.uplink_bits = {q.uplink_bits} must be 0 (off), 8 or 4")
    _require(q.general_examples >= 1,
             f"quantization.general_examples = {q.general_examples} must be >= 1")
    _require(not (q.base_noise != "none" and q.base == "none"),
             f"quantization.base_noise = {q.base_noise!r} needs a quantized base: set "
             "quantization.base (e.g. 'q4_0'), or base_noise = 'none'")
    _require(not (q.transfer != "adapter" and q.base == "none"),
             f"quantization.transfer = {q.transfer!r} needs a quantized base: set "
             "quantization.base (e.g. 'q4_0'), or transfer = 'adapter'")
    _require(not (q.transfer == "distill" and not q.public_text),
             "quantization.transfer = 'distill' needs public text to distill on: set "
             "quantization.public_text to a JSONL of public texts in the task's domain (a 'text' "
             "field per line), or transfer = 'adapter'")
    _require(not (q.public_text and q.transfer != "distill"),
             f"quantization.public_text is set but transfer = {q.transfer!r} does not read it; "
             "set transfer = 'distill' or remove public_text")
    _require(q.public_examples >= 1,
             f"quantization.public_examples = {q.public_examples} must be >= 1")
    _require(q.distill_steps >= 1, f"quantization.distill_steps = {q.distill_steps} must be >= 1")
    _require(q.distill_lr > 0, f"quantization.distill_lr = {q.distill_lr} must be > 0")
    _require(not (q.general_text and q.base == "none"),
             "quantization.general_text is set but quantization.base = 'none': the perplexity gap "
             "compares the central model with a client's quantized one; set quantization.base "
             "(e.g. 'q4_0') or remove general_text")


def _validate_privacy(p: PrivacyConfig) -> None:
    if p.mode == "none":
        for name in ("noise_multiplier", "target_epsilon", "sample_rate"):
            _require(
                getattr(p, name) is None,
                f"privacy.{name} is set but privacy.mode = 'none'; "
                "set privacy.mode to 'sample', 'client' or 'local', or remove the field",
            )
        _require(not p.reproducible_noise,
                 "privacy.reproducible_noise = true but privacy.mode = 'none' draws no noise; "
                 "remove it, or set privacy.mode")
        return
    _require(
        p.noise_multiplier is not None or p.target_epsilon is not None,
        f"privacy.mode = {p.mode!r} needs privacy.noise_multiplier or privacy.target_epsilon "
        "(with both, target_epsilon is the budget the run must fit)",
    )
    if p.noise_multiplier is not None:
        _require(p.noise_multiplier > 0, f"privacy.noise_multiplier = {p.noise_multiplier} must be > 0")
    if p.target_epsilon is not None:
        _require(p.target_epsilon > 0, f"privacy.target_epsilon = {p.target_epsilon} must be > 0")
    _require(p.clip > 0, f"privacy.clip = {p.clip} must be > 0 (an L2 bound on the update)")
    _require(0 < p.delta < 1, f"privacy.delta = {p.delta} must be in (0, 1), e.g. 1e-5")
    if p.sample_rate is not None:
        _require(p.mode == "sample", f"privacy.sample_rate = {p.sample_rate} applies to "
                 f"privacy.mode = 'sample' only, not {p.mode!r}; remove it")
        _require(0 < p.sample_rate <= 1, f"privacy.sample_rate = {p.sample_rate} not in (0, 1]")


# Settings a resumed run may change: none of them touches what is released or how it is
# accounted (federation.rounds may change too: the resumed plan keeps the run's sigma, so more
# rounds than the budget holds are refused by the plan itself).
RESUMABLE = frozenset({"model.device", "train.microbatch", "train.gradient_checkpointing",
                       "federation.eval_every",
                       "federation.round_timeout", "federation.connect_timeout",
                       "federation.min_clients", "federation.rounds"})


def refuse_changes(saved: RunConfig, new: RunConfig) -> None:
    """Refuse a resume whose config differs from the run's own in anything but RESUMABLE,
    naming the first such setting."""
    for section in _settings(RunConfig):
        old_value, new_value = getattr(saved, section.name), getattr(new, section.name)
        if not dataclasses.is_dataclass(old_value):
            keys = [(section.name, old_value, new_value)]
        else:
            keys = [(f"{section.name}.{f.name}", getattr(old_value, f.name),
                     getattr(new_value, f.name)) for f in dataclasses.fields(old_value)]
        for key, was, now in keys:
            if was != now and key not in RESUMABLE:
                raise ConfigError(
                    f"--resume: {key} = {now!r} differs from the run's {was!r}; a resumed run "
                    "keeps every setting that shapes what is trained, released or accounted. "
                    f"Drop that override (only {sorted(RESUMABLE)} may change)"
                )
    if saved.train.lr_schedule != "constant" and saved.federation.rounds != new.federation.rounds:
        raise ConfigError(
            f"--resume: federation.rounds = {new.federation.rounds} differs from the run's "
            f"{saved.federation.rounds}, and train.lr_schedule = {saved.train.lr_schedule!r} "
            "spreads its decay over the rounds the run started with: changing them would make "
            "the remaining rounds take rates neither plan gives. Resume with "
            f"federation.rounds = {saved.federation.rounds}")


def without_privacy(config: RunConfig) -> RunConfig:
    """Return ``config`` with the default [privacy] section (mode 'none'): the non-private twin."""
    return dataclasses.replace(config, privacy=PrivacyConfig())


def to_toml(config: RunConfig) -> str:
    """Render the resolved config as TOML (None fields are omitted)."""
    lines = [f"seed = {config.seed}"]
    for section in _settings(RunConfig):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        lines.append(f"\n[{section.name}]")
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is not None:
                lines.append(f"{f.name} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def toml_value(v: Any) -> str:
    """Render one setting's value as config.toml writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, tuple | list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)
