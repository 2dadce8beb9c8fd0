"""bench/utility.py's table arithmetic: the eval-set size it reads from a row's config is the
product's own split, and a cell the plan calls "learns" must clear its floor by two standard
errors."""

import importlib
import json
import sys
from pathlib import Path

import pytest

from privlora.config import load_config
from privlora.server import load_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
utility = importlib.import_module("utility")


def _jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": "ab"[i % 2]}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("max_eval", [7, 1000])
def test_eval_size_is_the_products_split(tmp_path, max_eval):
    rows = _jsonl(tmp_path / "train.jsonl", 93)
    held_out = load_config(None, [f"data.path={str(rows)!r}", f"data.max_eval={max_eval}"])
    fixed = load_config(None, [f"data.path={str(rows)!r}", f"data.max_eval={max_eval}",
                               f"data.eval_path={str(_jsonl(tmp_path / 'eval.jsonl', 11))!r}"])
    builtin = load_config(None, ["data.builtin_examples=150", f"data.max_eval={max_eval}"])
    for config in (held_out, fixed, builtin):
        assert utility.eval_size(config) == len(load_rows(config)[2])


def test_floor_margin_is_in_binomial_standard_errors():
    # a floor of 0.5 on 100 examples has a standard error of 0.05
    assert utility.floor_margin(0.75, 0.5, 100) == pytest.approx(5.0)
    assert utility.floor_margin(0.5, 0.5, 100) == 0.0
    assert utility.floor_margin(0.45, 0.5, 400) == pytest.approx(-2.0)


def test_learns_needs_two_standard_errors_above_the_floor():
    assert utility.agrees("learns", 0.9, margin=2.5)
    assert not utility.agrees("learns", 0.9, margin=1.9)
    assert utility.agrees("learns", 0.9)  # margin unknown: judged on the share alone
    assert not utility.agrees("learns", 0.4, margin=9.0)


def test_loss_margin_combines_both_standard_errors():
    row = {"zero_shot_loss": 3.0, "loss": 2.5, "zero_shot_loss_se": 0.03, "loss_se": 0.04}
    assert utility.loss_margin(row) == pytest.approx(10.0)  # 0.5 / 0.05
    assert utility.loss_margin({**row, "loss_se": None}) is None
    assert utility.loss_margin({**row, "loss_drop_se": 0.01}) == pytest.approx(50.0)  # paired


def test_twin_is_the_same_switches_then_more_then_fewer():
    grouped = {c: [{}] for c in ("nodp", "nodp+auto+budget4096", "nodp+label")}
    assert utility._twin("sample-8+label", grouped) == "nodp+label"
    assert utility._twin("sample-8+auto", grouped) == "nodp+auto+budget4096"
    assert utility._twin("sample-8+auto+budget16384", grouped) == "nodp"
    assert utility._twin("sample-8", {}) is None
    # +rankN changes the private adapter only: the non-private twin is the same
    assert utility._twin("sample-8+auto+rank2", grouped) == "nodp+auto+budget4096"
    assert (utility._twin("nodp+auto+recipe8+rank2", grouped)
            == utility._twin("nodp+auto+recipe8", grouped))
    # so does a key the user set: measured against the recipe it changes
    recipe = {**grouped, "nodp+auto+recipe8": [{}]}
    assert (utility._twin("nodp+auto+recipe8+federation.aggregation=fedavg", recipe)
            == "nodp+auto+recipe8")
    assert utility._twin("sample-8+auto+train.lr=0.01", grouped) == "nodp+auto+budget4096"
    # the noise-free recipe itself is measured against the non-private run, never itself
    assert utility._twin("nodp+auto+recipe8", recipe) == "nodp+auto+budget4096"
    assert utility._twin("nodp+auto+recipe8", {**recipe, "nodp+auto": [{}]}) == "nodp+auto"


def test_rank_switch_sets_the_rank_on_every_layer_and_auto_keeps_it():
    from privlora.privacy.recipe import resolve

    for cell in ("sample-8+auto+rank3", "nodp+auto+recipe8+rank3"):
        c = resolve(utility.cell_config("builtin", cell, 0, quick=True)).config
        assert (c.lora.rank, c.lora.last_layers) == (3, 0), cell  # quick's 1 layer overridden
        assert {"lora.rank", "lora.last_layers"} <= c.explicit, cell
    for bad in ("nodp+auto+rank2", "sample-8+auto+rank2+rank3", "sample-8+auto+rank0"):
        with pytest.raises(SystemExit, match="rankN"):
            utility.cell_config("builtin", bad, 0, quick=True)


def test_key_switch_is_the_users_setting_and_auto_chooses_the_rest():
    from privlora.privacy.recipe import resolve

    cell = "nodp+auto+recipe8+federation.aggregation=fedavg+lora.last_layers=0"
    c = utility.cell_config("builtin", cell, 0, quick=True)
    base = utility.cell_config("builtin", "nodp+auto+recipe8", 0, quick=True)
    assert (c.federation.aggregation, c.lora.last_layers) == ("fedavg", 0)
    assert (base.federation.aggregation, base.lora.last_layers) == ("ffa", 1)
    assert (c.train, c.lora.rank) == (base.train, base.lora.rank)  # the rest: auto's, unchanged
    private = resolve(utility.cell_config("builtin", "sample-8+auto+train.lr=0.005", 0,
                                          quick=True)).config
    assert private.train.lr == 0.005 and "train.lr" in private.explicit
    with pytest.raises(ValueError):  # a key the config does not have: the config's own error
        utility.cell_config("builtin", "sample-8+auto+train.nope=1", 0, quick=True)


def test_cells_split_on_commas_outside_a_list_value():
    cells = 'nodp,sample-8+auto+lora.target_modules=["q_proj","v_proj"]+lora.last_layers=0,sample-2'
    assert utility.split_cells(cells) == [
        "nodp", 'sample-8+auto+lora.target_modules=["q_proj","v_proj"]+lora.last_layers=0',
        "sample-2"]
    c = utility.cell_config("builtin", utility.split_cells(cells)[1], 0, quick=True)
    assert c.lora.target_modules == ("q_proj", "v_proj")


def test_recipe_cell_is_the_private_recipe_without_privacy():
    from privlora.privacy.recipe import resolve

    private = resolve(utility.cell_config("builtin", "sample-8+auto", 0, quick=True)).config
    plain = utility.cell_config("builtin", "nodp+auto+recipe8", 0, quick=True)
    assert private.privacy.mode == "sample" and plain.privacy.mode == "none"
    assert (plain.lora, plain.train, plain.federation, plain.data) == (
        private.lora, private.train, private.federation, private.data)
    assert plain.lora.rank == 2  # auto's DP adapter, not its non-private one
    with pytest.raises(SystemExit, match="recipeE"):
        utility.cell_config("builtin", "sample-8+auto+recipe8", 0, quick=True)


def test_a_row_names_the_dtype_auto_resolved_to_and_a_cell_every_device():
    import torch

    from privlora.models import train_dtype

    common = importlib.import_module("_common")
    assert common.device_label("cpu", "auto").endswith(
        f", {train_dtype('auto', torch.device('cpu'))})")
    assert common.device_label("cpu", "float32").endswith(", float32)")
    rows = [{"device": "a"}, {"device": "b"}, {"device": "a"}, {}]
    assert common.devices(rows) == "a; b; cpu"
