"""The shipped configs are private by default, fit their budget, and name a learnable plan."""

from pathlib import Path

import pytest

from privlora import data
from privlora.config import load_config, without_privacy
from privlora.privacy.plan import make_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _sizes(config):
    task = data.load_task(config.data, config.seed)
    train, _ = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
    return [len(p) for p in data.partition(train, config.data, config.federation.num_clients,
                                           config.seed)]


def test_the_demo_is_sample_level_dp_within_epsilon_8_with_secure_noise():
    config = load_config(CONFIGS / "demo.toml")
    assert config.privacy.mode == "sample" and not config.privacy.reproducible_noise
    sizes = _sizes(config)
    plan = make_plan(config, sizes)
    assert plan.epsilon <= 8.0 and plan.delta == 1e-5
    # the configured rate gives about train.batch_size examples per step at every client
    assert all(abs(config.privacy.sample_rate * n / config.train.batch_size - 1) < 0.05
               for n in sizes)
    assert without_privacy(config).privacy.mode == "none"  # make demo PRIVACY=off


@pytest.mark.parametrize("name", ["sst2", "fpb", "fiqa", "pubmedqa", "dolly"])
def test_the_shared_data_configs_fit_their_budget_and_rate(name):
    config = load_config(CONFIGS / f"{name}.toml")
    if not Path(config.data.path).is_file():
        pytest.skip(f"{config.data.path} is not beside this checkout")
    sizes = _sizes(config)
    assert make_plan(config, sizes).epsilon <= 8.0
    assert all(abs(config.privacy.sample_rate * n / config.train.batch_size - 1) < 0.05
               for n in sizes)
