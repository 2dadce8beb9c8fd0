"""``privlora privacy plan``: what a config will spend, and (local mode) the noise it adds.

Runs where the data is: it may look at the clients' example counts to suggest a sample rate,
which the run itself never does.
"""

from __future__ import annotations

from pathlib import Path

from privlora import data
from privlora.config import load_config
from privlora.privacy.plan import lacks_sample_rate, make_plan, suggest_sample_rate
from privlora.privacy.variance import local_noise_variance, summarize


def plan_report(config_path: Path, overrides: list[str]) -> dict:
    """Return the plan of ``config_path`` as a dict with a human-readable ``text`` field."""
    config = load_config(config_path, overrides)
    task = data.load_task(config.data, config.seed)
    train_rows, _ = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
    parts = data.partition(train_rows, config.data, config.federation.num_clients, config.seed)
    sizes = [len(p) for p in parts]
    lines, suggested = [], None
    if lacks_sample_rate(config):
        suggested = suggest_sample_rate(config.train.batch_size, sizes)
        lines.append(f"suggested privacy.sample_rate = {suggested:.4g} (train.batch_size / median "
                     "client size); put it in the config: the run uses a fixed, public rate")
        config = load_config(config_path, [*overrides, f"privacy.sample_rate={suggested!r}"])
    plan = make_plan(config, sizes)
    report = plan.to_dict()
    if report is None:
        return {"mode": "none", "text": "privacy.mode = 'none': no privacy events, epsilon = inf"}
    per_round = plan.round_events(range(config.federation.num_clients))
    parties = "global" if list(per_round) == ["global"] else "per client (worst case: every round)"
    lines += [
        f"mode: {plan.mode}   neighbouring: {plan.neighbouring}",
        f"events per round, {parties}: {next(iter(per_round.values()))}",
        (f"noise std = sigma x sensitivity = {plan.noise_multiplier:.4f} x {plan.sensitivity:g} "
         f"= {plan.noise_std:.4f}"),
        f"epsilon at delta={plan.delta:g}: PLD {plan.epsilon_pld:.4f}  RDP {plan.epsilon_rdp:.4f}"
        + (f"  (target {plan.target_epsilon})" if plan.target_epsilon else ""),
        f"noise source: {plan.noise_source}",
    ]
    report["suggested_sample_rate"] = suggested
    if plan.release_mechanism() is not None:  # DP-FedLoRA: clients noise their own factors
        report["variance"] = v = _local_variance(config, plan.noise_std)
        lines.append(
            "local-DP noise in the aggregated update (per round, at initialisation): "
            f"E||noise||_F^2 = {v['expected_sq_frobenius']:.4g} (cross term beta*alpha "
            f"{v['cross_term']:.4g}); max per-entry variance {v['max_per_entry_variance']:.4g}; "
            "E[update] is unbiased"
        )
    report["text"] = "\n".join(lines)
    return report


def _local_variance(config, noise_std: float) -> dict:
    """Variance report from the real layer shapes (a meta-device model: no weights loaded)."""
    from dataclasses import asdict

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from privlora import models
    from privlora.lora import attach, read_adapter, spec_of
    from privlora.rules import build_rule

    name = config.model.name
    if name == models.TINY_RANDOM:
        model = models.tiny_random_llama(len(models.load_tokenizer(name)))
    else:
        hf_config = AutoConfig.from_pretrained(models.local_source(name))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        model = model.to_empty(device="cpu")
    spec = spec_of(config.lora)
    adapter = read_adapter(attach(model, spec, config.seed))
    rule = build_rule(config)
    # At initialisation B = 0, so the B-alpha term is 0; later rounds use the trained factors.
    rows = local_noise_variance(adapter, noise_std, config.federation.per_round, spec.scale,
                                noise_a=rule.trains_a,
                                products_averaged=rule.averages_products)
    return {**summarize(rows), "layers": [asdict(r) for r in rows[:4]]}
