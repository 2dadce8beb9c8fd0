"""privacy.recipe = "auto": chosen from public, declared quantities only; what the user set wins;
resolved once into concrete values that survive to_toml, reload and resume."""

from __future__ import annotations

import json

import pytest

from privlora import data
from privlora.architectures import ModelFacts, facts_of, model_facts
from privlora.config import (
    RunConfig,
    config_from_toml,
    fixed_keys,
    load_config,
    refuse_changes,
    to_toml,
    validate,
)
from privlora.errors import ConfigError
from privlora.privacy import recipe, recipe_steps
from privlora.privacy.recipe import choose, resolve, wanted
from privlora.privacy.recipe_steps import PRIVATE_BUDGET
from privlora.privacy.signal import LEARNS
from tests.builders import tiny_llama

# SmolLM2-135M's shapes as auto sees them (model_facts("builtin")): v_proj 576 -> 192, 30 layers
SMOL = ModelFacts(134_515_008, 30, {"q_proj": (576, 576, 30), "k_proj": (576, 192, 30),
                                    "v_proj": (576, 192, 30), "o_proj": (576, 576, 30)},
                  ("q_proj", "v_proj"))
DEMO_LIKE = ("privacy.recipe=auto", "privacy.mode=sample", "privacy.target_epsilon=8",
             "federation.num_clients=2", "data.examples_per_client=20000")


def auto(*overrides: str) -> RunConfig:
    return load_config(None, [*DEMO_LIKE, *overrides])


def fast(*overrides: str) -> RunConfig:
    """``auto`` with sigma given instead of calibrated: the same choices, no accounting."""
    return load_config(None, [*DEMO_LIKE[:2], *DEMO_LIKE[3:], "privacy.noise_multiplier=0.35",
                              *overrides])


def test_the_demo_like_declaration_gets_the_demo_recipe_and_a_forecast_that_learns():
    chosen = choose(auto(), SMOL)
    c = chosen.config
    assert (c.federation.aggregation, c.lora.rank, c.lora.target_modules) == ("ffa", 2, ("v_proj",))
    assert c.lora.last_layers == 0 and c.train.loss == "label" and c.federation.rounds == 3
    assert c.train.local_steps == 14  # 42 steps per client: the demo's
    # the largest batch the default budget pays for, and the rate that gives it
    assert c.train.batch_size == PRIVATE_BUDGET // (3 * 14 * 2) == 48
    assert c.privacy.sample_rate == pytest.approx(48 / 20_000)
    assert c.train.lr == pytest.approx(2e-2 * (48 / 36) ** 0.5, rel=1e-3)
    assert chosen.signal.verdict == "learns" and chosen.signal.coordinates == 11_520
    assert 3 * 14 * 2 * 48 <= PRIVATE_BUDGET
    text = "\n".join(chosen.lines())
    assert "costs no privacy" in text and "never reads the data" in text
    assert "LEARNS" in text and "(auto:" in text


def test_settings_the_user_made_always_win(tmp_path):
    mine = ("lora.rank=4", "train.local_steps=5", "train.batch_size=20", "train.lr=0.01",
            "federation.aggregation=fedavg", "train.loss=answer")
    chosen = choose(fast(*mine), SMOL)
    c = chosen.config
    assert (c.lora.rank, c.train.local_steps, c.train.batch_size, c.train.lr) == (4, 5, 20, 0.01)
    assert c.federation.aggregation == "fedavg" and c.train.loss == "answer"
    assert c.privacy.sample_rate == pytest.approx(20 / 20_000)  # follows the user's batch
    assert {ch.key for ch in chosen.choices if not ch.auto} == {
        "lora.rank", "train.local_steps", "train.batch_size", "train.lr",
        "federation.aggregation", "train.loss"}
    assert sum("(set in the config)" in line for line in chosen.lines()) == 6
    # the same from a config file, and a sample rate the user set fixes the batch instead
    path = tmp_path / "c.toml"
    path.write_text('[privacy]\nrecipe = "auto"\nmode = "sample"\nnoise_multiplier = 0.35\n'
                    'sample_rate = 0.003\n[data]\nexamples_per_client = 20000\n'
                    '[federation]\nnum_clients = 2\n')
    c = choose(load_config(path), SMOL).config
    assert c.privacy.sample_rate == 0.003 and c.train.batch_size == 60
    # a config built in Python: whatever differs from the defaults counts as set
    built = fast()
    built = RunConfig(privacy=built.privacy, data=built.data, federation=built.federation,
                      lora=type(built.lora)(rank=3))
    assert choose(built, SMOL).config.lora.rank == 3


def test_the_loss_follows_the_task_kind_from_the_config_alone():
    assert choose(fast(), SMOL).config.train.loss == "label"  # the built-in task classifies
    generation = choose(fast("data.path=/no/such.jsonl", "data.kind=generation"), SMOL)
    assert generation.config.train.loss == "answer"
    unknown = choose(fast("data.path=/no/such.jsonl"), SMOL)  # only the data would tell
    assert "train.loss" not in wanted(unknown.config)
    assert any("data.kind" in reason for reason in unknown.reasons)


def test_larger_declared_data_and_budget_get_larger_batches_within_the_budget():
    budget = "train.max_examples_processed=100000"
    small = choose(fast(budget, "data.examples_per_client=2000"), SMOL).config
    large = choose(fast(budget), SMOL).config
    assert small.train.batch_size <= 2000 // 4  # at most a quarter of the declared examples
    assert large.train.batch_size > small.train.batch_size
    for c in (small, large):
        assert c.federation.rounds * c.train.local_steps * 2 * c.train.batch_size <= 100_000
    cheap = choose(fast("train.max_examples_processed=2000"), SMOL).config
    assert cheap.train.batch_size < choose(fast(), SMOL).config.train.batch_size
    # without DP: local steps so that each declared example is seen about twice
    steps = [choose(load_config(None, ["privacy.recipe=auto", f"data.examples_per_client={n}"]),
                    None).config.train.local_steps for n in (500, 2386)]
    # 2 passes over 4 clients' examples, 5 rounds x 4 clients x batch 8 per local step
    assert steps == [2 * 4 * 500 // (5 * 4 * 8), 2 * 4 * 2386 // (5 * 4 * 8)] == [25, 119]


def test_a_budget_too_small_for_any_private_recipe_is_refused_naming_it():
    with pytest.raises(ConfigError, match="budget of train.max_examples_processed = 500 cannot pay"):
        choose(auto("train.max_examples_processed=500"), SMOL)


def test_auto_in_sample_mode_needs_the_declared_examples_per_client():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["privacy.recipe=auto", "privacy.mode=sample",
                           "privacy.target_epsilon=8"])
    message = str(err.value)
    assert "data.examples_per_client" in message and "published" in message
    assert "\n" not in message
    load_config(None, ["privacy.recipe=auto", "privacy.mode=local", "privacy.target_epsilon=8"])


def test_the_choice_never_reads_the_data(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("auto read the data")

    monkeypatch.setattr(data, "load_task", no_data)
    monkeypatch.setattr(data, "split", no_data)
    monkeypatch.setattr(data, "partition", no_data)
    config = auto("data.path=/no/such/file.jsonl", "data.kind=classification",
                  "model.name=tiny-random")
    chosen = resolve(config)
    assert chosen.config.train.batch_size == 48 and chosen.config.train.loss == "label"


def test_resolved_once_then_fixed_through_to_toml_reload_and_resume(tmp_path, monkeypatch):
    chosen = resolve(auto("model.name=tiny-random"))
    path = tmp_path / "config.toml"
    path.write_text(to_toml(chosen.config))
    reloaded = load_config(path)
    assert reloaded == chosen.config and reloaded.privacy.recipe == "auto"
    assert set(wanted(reloaded)) <= fixed_keys(reloaded)
    refuse_changes(config_from_toml(path.read_text()), load_config(path, ["train.microbatch=8"]))
    # resolving again (the server, a resumed run, a Flower site) changes nothing and looks at
    # nothing: not even the model
    monkeypatch.setattr("privlora.architectures.model_facts", lambda name: 1 / 0)
    for again in (chosen.config, reloaded):
        assert resolve(again).config == chosen.config
    with pytest.raises(ConfigError, match="train.batch_size"):
        refuse_changes(reloaded, load_config(path, ["train.batch_size=7"]))


def test_the_coordinates_auto_counts_are_the_adapter_s(tokenizer):
    from privlora.lora import LoraSpec, attach, read_adapter, released_coordinates

    facts = facts_of(tiny_llama(tokenizer))
    for targets, rank, last, trains_a in [(("v_proj",), 2, 0, False), ((), 4, 1, True),
                                          (("q_proj", "v_proj"), 3, 0, True)]:
        spec = LoraSpec(rank, 8, 0.0, targets or facts.default_targets, last)
        adapter = read_adapter(attach(tiny_llama(tokenizer), spec, seed=0))
        assert facts.coordinates(targets, rank, last, trains_a) == released_coordinates(
            adapter, trains_a)


def test_too_many_coordinates_adapt_the_last_layers_only():
    wide = ModelFacts(7_000_000_000, 32, {"v_proj": (4096, 1024, 32)}, ("q_proj", "v_proj"))
    c = choose(fast(), wide).config
    assert c.lora.last_layers == recipe.MAX_COORDINATES // (2 * 1024) == 8
    assert wide.coordinates(("v_proj",), 2, c.lora.last_layers, False) <= recipe.MAX_COORDINATES


def test_a_marginal_forecast_keeps_every_layer():
    """FPB's declaration at epsilon 2 forecasts marginal with every layer adapted; adapting the
    last layers only would lower the forecast, and was measured to learn nothing (module
    docstring), so auto keeps them all and says the forecast is marginal."""
    declared = ["privacy.recipe=auto", "privacy.mode=sample", "privacy.target_epsilon=2",
                "federation.num_clients=4", "data.examples_per_client=510",
                "data.kind=classification"]
    chosen = choose(load_config(None, declared), SMOL)
    assert chosen.config.lora.last_layers == 0 and chosen.signal.coordinates == 11_520
    assert chosen.signal.verdict == "marginal" and "MARGINAL" in "\n".join(chosen.lines())
    # no budget of up to 16x the default forecasts learns here, and auto says so
    assert chosen.reasons[-1].startswith("even train.max_examples_processed = 65,536 (x16")


def test_a_marginal_forecast_names_the_budget_that_would_learn():
    """FPB's declaration at epsilon 8 forecasts marginal within the default budget; auto says
    which larger train.max_examples_processed forecasts learns, and a run that sets it gets a
    recipe whose forecast is that number and learns."""
    declared = ["privacy.recipe=auto", "privacy.mode=sample", "privacy.target_epsilon=8",
                "federation.num_clients=4", "data.examples_per_client=510",
                "data.kind=classification"]
    chosen = choose(load_config(None, declared), SMOL)
    assert chosen.signal.verdict == "marginal"
    hint = [r for r in chosen.reasons if r.startswith("to forecast LEARNS")]
    assert len(hint) == 1, chosen.reasons
    budget = int(hint[0].split("= ")[1].split(" ")[0].replace(",", ""))
    forecast = float(hint[0].rsplit(" ", 1)[1])
    assert budget in [recipe_steps.PRIVATE_BUDGET * f for f in recipe_steps.BUDGET_FACTORS]
    larger = choose(load_config(None, [*declared, f"train.max_examples_processed={budget}"]), SMOL)
    assert larger.signal.whole_run == pytest.approx(forecast, abs=5e-4)
    assert larger.signal.verdict == "learns" and forecast <= LEARNS < chosen.signal.whole_run
    # a learning forecast needs no hint
    assert not [r for r in larger.reasons if "LEARNS:" in r or r.startswith("even ")]


def test_model_facts_of_the_tiny_model_from_its_config():
    facts = model_facts("tiny-random")
    assert facts.layers == 2 and facts.modules["v_proj"] == (32, 16, 2)


def test_privacy_plan_prints_the_recipe_and_who_set_each_value(tmp_path):
    from typer.testing import CliRunner

    from privlora.cli import app

    config = tmp_path / "c.toml"
    config.write_text('[model]\nname = "tiny-random"\n[data]\nbuiltin_examples = 120\n'
                      'examples_per_client = 24\n[train]\nlr = 0.01\n'
                      '[privacy]\nrecipe = "auto"\nmode = "sample"\ntarget_epsilon = 8.0\n'
                      'delta = 1e-3\n')
    result = CliRunner().invoke(app, ["privacy", "plan", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["recipe"]["set_in_config"] == {"train.lr": 0.01}
    assert report["recipe"]["chosen"]["train.batch_size"] == 24 // 4
    assert report["sample_rate"] == report["recipe"]["chosen"]["privacy.sample_rate"] == 0.25
    assert report["suggested_sample_rate"] is None  # auto chose it, from the declaration
    text = report["text"]
    assert text.startswith("recipe: auto") and "costs no privacy" in text
    assert "train.lr" in text and "(set in the config)" in text
    validate(load_config(config))


def test_a_run_resolves_auto_once_and_saves_the_concrete_values(tmp_path, read_metrics):
    from typer.testing import CliRunner

    from privlora.cli import app

    tiny = ["--model", "tiny-random", "--set", "model.dtype=float32",
            "--set", "data.builtin_examples=120", "--set", "data.max_eval=8",
            "--set", "federation.rounds=1", "--set", "train.local_steps=2"]
    auto_dp = ["--set", "privacy.recipe=auto", "--set", "privacy.mode=sample",
               "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.delta=1e-3",
               "--set", "data.examples_per_client=24"]
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["run", *tiny, *auto_dp, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "recipe: auto" in result.output and "costs no privacy" in result.output
    saved = load_config(out / "config.toml")
    assert saved.privacy.recipe == "auto" and saved.federation.aggregation == "ffa"
    assert saved.train.batch_size == 24 // 4 and saved.privacy.sample_rate == 0.25
    assert saved.train.local_steps == 2 and saved.federation.rounds == 1  # set by the user
    assert resolve(saved).config == saved and len(read_metrics(out)) == 2


@pytest.mark.parametrize("mode", ["client", "local"])
def test_in_client_and_local_modes_auto_takes_the_rounds_with_the_best_forecast(mode):
    """Each round is one clipped release whatever the local training did: auto compares the
    forecast of each candidate number of rounds (the plan's own calibration and function,
    recomputed here for each) and spends the compute budget on local steps."""
    from privlora.privacy.plan import make_plan, predicted_signal

    overrides = ["privacy.recipe=auto", f"privacy.mode={mode}", "privacy.target_epsilon=8",
                 "federation.num_clients=200", "data.examples_per_client=500",
                 "train.max_examples_processed=200000"]
    chosen = choose(load_config(None, overrides), SMOL)
    c = chosen.config
    forecasts = {}
    for rounds in recipe_steps.RELEASE_ROUNDS:  # independently: the same config at each round count
        candidate = load_config(None, [*overrides, f"federation.rounds={rounds}",
                                       "federation.aggregation=ffa", "lora.rank=2",
                                       "lora.target_modules=[\"v_proj\"]"])
        plan = make_plan(candidate, [500] * 200)
        forecasts[rounds] = predicted_signal(plan, 11_520, candidate.federation).whole_run
    best = min(forecasts.values())
    assert forecasts[c.federation.rounds] == pytest.approx(best, rel=1e-3)
    assert chosen.signal.whole_run == pytest.approx(best, rel=1e-3)
    assert c.train.batch_size == recipe_steps.RELEASE_BATCH
    processed = c.federation.rounds * c.federation.per_round * c.train.local_steps * 32
    assert processed <= 200_000 and c.train.local_steps >= 1
    assert c.federation.rounds * c.train.local_steps * 32 <= 2 * 500  # two passes per client
    assert "chosen:" in "\n".join(chosen.lines())


def test_in_local_mode_rounds_the_user_set_stay_and_the_steps_follow_them():
    overrides = ["privacy.recipe=auto", "privacy.mode=local", "privacy.target_epsilon=8",
                 "federation.num_clients=4", "federation.rounds=2",
                 "train.max_examples_processed=2048"]
    c = choose(load_config(None, overrides), SMOL).config
    assert c.federation.rounds == 2
    assert c.train.local_steps == 2048 // (2 * 4 * recipe_steps.RELEASE_BATCH)


def test_in_local_mode_the_choice_never_reads_the_data(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("auto read the data")

    for name in ("load_task", "split", "partition", "read_rows"):
        monkeypatch.setattr(data, name, no_data)
    config = load_config(None, ["privacy.recipe=auto", "privacy.mode=local",
                                "privacy.target_epsilon=8", "data.kind=classification",
                                "data.path=/no/such/file.jsonl", "model.name=tiny-random"])
    chosen = resolve(config).config
    assert chosen.federation.rounds in recipe_steps.RELEASE_ROUNDS and chosen.train.loss == "label"


TINY_AUTO = ("model.name=tiny-random", "model.dtype=float32", *DEMO_LIKE)


def test_minutes_become_the_examples_the_timed_step_pays_for():
    """train.max_minutes: the draft recipe's step is timed once (here a stand-in timer, 10 ms
    per example), the minutes become train.max_examples_processed, and the recipe fits it."""
    timed = []

    def timer(draft: RunConfig) -> float:
        timed.append(draft)
        return 0.01

    minutes = 0.5
    chosen = resolve(load_config(None, [*TINY_AUTO, f"train.max_minutes={minutes}"]), timer)
    c = chosen.config
    assert len(timed) == 1 and timed[0].federation.aggregation == "ffa"  # the draft's adapter
    assert timed[0].lora.rank == 2 and timed[0].privacy.mode == "sample"
    assert c.train.max_examples_processed == int(minutes * 60 / 0.01) == 3000
    processed = c.federation.rounds * c.train.local_steps * 2 * c.train.batch_size
    assert processed <= 3000 and c.train.batch_size == 3000 // (3 * 14 * 2)
    why = {ch.key: ch.why for ch in chosen.choices}["train.max_examples_processed"]
    assert "0.5 minutes" in why and "10 ms per example" in why and "no data" in why
    # resolved once: a resume or a site reads the same budget, and nothing is timed again
    again = resolve(c, timer)
    assert again.config == c and len(timed) == 1


def test_a_budget_in_examples_set_beside_minutes_wins():
    def timer(draft: RunConfig) -> float:
        raise AssertionError("nothing to time: the budget is given in examples")

    c = resolve(load_config(None, [*TINY_AUTO, "train.max_minutes=5",
                                   "train.max_examples_processed=2016"]), timer).config
    assert c.train.max_examples_processed == 2016 and c.train.batch_size == 2016 // (3 * 14 * 2)


def test_max_minutes_without_auto_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"train\.max_minutes = 5\.0 is a budget for "
                                          r"privacy\.recipe = 'auto'"):
        load_config(None, ["train.max_minutes=5"])


@pytest.mark.parametrize("mode", ["sample", "none"])
def test_the_step_is_timed_without_reading_any_data(tmp_path, mode):
    """The timing runs the product's local update on synthetic token ids of data.max_length,
    with the label loss: a data path that does not exist is never opened (opening it would
    raise), and the time per example is positive and finite."""
    from privlora import compute_budget

    privacy = (["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.sample_rate=0.1"]
               if mode == "sample" else [])
    config = load_config(None, ["model.name=tiny-random", "model.dtype=float32",
                                f"data.path={str(tmp_path / 'absent.jsonl')!r}",
                                "data.max_length=32", "train.loss=label", "train.microbatch=8",
                                "train.threads=1", *privacy])
    per_example = compute_budget.seconds_per_example(config)
    assert 0 < per_example < 60


def test_synthetic_examples_have_the_length_and_label_tokens_asked():
    from privlora import compute_budget

    examples, labels = compute_budget.synthetic_examples(8, 1000, 32, seed=0)
    assert len(examples) == 8 and len(labels) == compute_budget.LABELS
    assert all(len(e.prompt) + len(e.answer) == 32 for e in examples)
    assert {e.answer[0] for e in examples} == set(labels)
    assert compute_budget.examples_in(2, 0.5) == 240
    with pytest.raises(ValueError, match="positive and finite"):
        compute_budget.examples_in(2, 0.0)


FPB_LIKE = ("privacy.recipe=auto", "privacy.mode=sample", "privacy.target_epsilon=8",
            "federation.num_clients=4", "data.examples_per_client=510",
            "data.kind=classification")


def test_no_budget_hint_when_the_user_fixed_sigma():
    """With privacy.noise_multiplier set beside the target epsilon, a larger budget's larger
    batch would overspend the target; auto gives no budget hint rather than a wrong one."""
    chosen = choose(load_config(None, [*FPB_LIKE, "privacy.noise_multiplier=0.61"]), SMOL)
    assert chosen.signal.verdict == "marginal"
    assert not [r for r in chosen.reasons if "LEARNS:" in r or r.startswith("even ")]


def test_minutes_are_timed_on_the_adapter_alone_whatever_steps_the_user_set():
    """The timed draft carries auto's adapter and loss but no budget-dependent choice, so a
    user's large train.local_steps cannot make the draft fail on the default budget."""
    timed = []

    def timer(draft: RunConfig) -> float:
        timed.append(draft)
        return 0.001

    c = resolve(load_config(None, [*TINY_AUTO, "train.local_steps=100",
                                   "train.max_minutes=60"]), timer).config
    assert len(timed) == 1 and timed[0].train.loss == "label" and timed[0].lora.rank == 2
    assert c.train.local_steps == 100 and c.train.max_examples_processed == 3_600_000


def test_minutes_beside_a_set_budget_say_they_are_not_used():
    chosen = choose(load_config(None, [*FPB_LIKE, "train.max_minutes=5",
                                       "train.max_examples_processed=4096"]), SMOL)
    assert any(r.startswith("train.max_minutes = 5 not used") for r in chosen.reasons)


def test_minutes_without_dp_need_the_declared_examples():
    with pytest.raises(ConfigError, match=r"train\.max_minutes without DP .* "
                                          r"data\.examples_per_client"):
        load_config(None, ["privacy.recipe=auto", "train.max_minutes=5"])
