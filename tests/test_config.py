"""Config loading: defaults, overrides, and one-line errors that name the field."""

import pytest

from privlora.config import RunConfig, load_config, to_toml
from privlora.errors import ConfigError


def test_defaults_and_overrides():
    config = load_config(None, ["federation.rounds=3", "privacy.mode=sample",
                                "privacy.target_epsilon=8", "lora.target_modules=q_proj"])
    assert config.federation.rounds == 3
    assert config.privacy.mode == "sample" and config.privacy.target_epsilon == 8.0
    assert config.lora.target_modules == ("q_proj",)
    assert load_config(None) == RunConfig()


def test_noise_is_secure_unless_reproducible_noise_is_asked_for():
    assert load_config(None).privacy.reproducible_noise is False
    seeded = load_config(None, ["privacy.mode=local", "privacy.noise_multiplier=1",
                                "privacy.reproducible_noise=true"])
    assert seeded.privacy.reproducible_noise
    with pytest.raises(ConfigError, match="privacy.mode = 'none' draws no noise"):
        load_config(None, ["privacy.reproducible_noise=true"])
    with pytest.raises(ConfigError, match="replaced by privacy.reproducible_noise"):
        load_config(None, ["privacy.secure_rng=true"])


def test_toml_round_trip(tmp_path):
    config = load_config(None, ["privacy.mode=local", "privacy.noise_multiplier=1.5",
                                "lora.client_ranks=[2, 4]", "federation.aggregation=exact"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


@pytest.mark.parametrize("override, words", [
    ("federation.round=3", ["unknown config key", "federation.round", "federation.rounds"]),
    ("federation.rounds='x'", ["federation.rounds", "int"]),
    ("privacy.mode=foo", ["privacy.mode", "sample"]),
    ("train.lr=-1", ["train.lr"]),
    ("lora.rank=0", ["lora.rank"]),
    ("privacy.sample_rate=0.1", ["privacy.sample_rate", "privacy.mode"]),
    ("nonsense", ["key=value"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("overrides, field", [
    (["privacy.mode=sample", "privacy.target_epsilon=0"], "privacy.target_epsilon"),
    (["privacy.mode=sample", "privacy.target_epsilon=-1"], "privacy.target_epsilon"),
    (["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.clip=0"], "privacy.clip"),
    (["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.delta=1"], "privacy.delta"),
    (["privacy.mode=sample"], "privacy.noise_multiplier"),
    (["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.sample_rate=1.5"],
     "privacy.sample_rate"),
    (["privacy.noise_multiplier=1"], "privacy.mode"),
    (["lora.client_ranks=[2, 4]"], "exact"),
    (["federation.client_fraction=1.5"], "federation.client_fraction"),
    (["federation.client_fraction=0.5", "federation.clients_per_round=2"], "not both"),
])
def test_privacy_field_errors(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_an_eval_file_needs_a_data_file():
    with pytest.raises(ConfigError, match="data.eval_path"):
        load_config(None, ["data.eval_path=val.jsonl"])


@pytest.mark.parametrize("overrides, words", [
    (['data.text_fields=["question"]'], ["data.text_fields", "builtin"]),
    (["data.path=d.jsonl", 'data.text_fields=["title", "text"]'], ["may not name 'text'"]),
    (["data.path=d.jsonl", 'data.text_fields=["question"]', "data.kind=generation"],
     ["data.text_fields", "classification"]),
    (["data.path=d.jsonl", "data.label_field=answer"], ["data.label_field", "data.text_fields"]),
])
def test_text_fields_errors_say_what_to_change(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_the_label_loss_is_for_classification():
    assert load_config(None, ["train.loss=label"]).train.loss == "label"
    with pytest.raises(ConfigError, match="train.loss = 'label'.*generation.*train.loss = 'answer'"):
        load_config(None, ["data.path=d.jsonl", "data.kind=generation", "train.loss=label"])
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(None, ["train.loss=labels"])


def test_momentum_is_sgds():
    assert load_config(None, ["train.optimizer=sgd", "train.momentum=0.9"]).train.momentum == 0.9
    with pytest.raises(ConfigError, match="train.momentum = 0.9 is SGD's.*train.optimizer = 'sgd'"):
        load_config(None, ["train.momentum=0.9"])
    with pytest.raises(ConfigError, match=r"train.momentum = 1.0 must be in \[0, 1\)"):
        load_config(None, ["train.optimizer=sgd", "train.momentum=1.0"])


def test_min_clients_is_checked_against_the_federation(tiny_config):
    with pytest.raises(ConfigError, match="federation.min_clients = 5"):
        tiny_config("federation.min_clients=5")
