"""``privlora privacy plan``: what a config will spend, and (local mode) the noise it adds."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from privlora import data
from privlora.config import load_config
from privlora.privacy.plan import make_plan
from privlora.privacy.variance import local_noise_variance, summarize


def plan_report(config_path: Path, overrides: list[str]) -> dict:
    """Return the plan of ``config_path`` as a dict with a human-readable ``text`` field."""
    config = load_config(config_path, overrides)
    task = data.load_task(config.data, config.seed)
    train_rows, _ = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
    parts = data.partition(train_rows, config.data, config.federation.num_clients, config.seed)
    plan = make_plan(config, [len(p) for p in parts])
    if plan is None:
        return {"mode": "none", "text": "privacy.mode = 'none': no privacy events, epsilon = inf"}
    lines = [
        f"mode: {plan.mode}   neighbouring: {plan.neighbouring}",
        f"events: {plan.releases} x "
        + (f"PoissonSampled(q={plan.sample_rate:.4g}, Gaussian(sigma={plan.noise_multiplier:.4f}))"
           if plan.mode != "local" else f"Gaussian(sigma={plan.noise_multiplier:.4f})")
        + (" per client (worst case: every round)" if plan.mode != "client" else " (global)"),
        (f"noise std = sigma x sensitivity = {plan.noise_multiplier:.4f} x {plan.sensitivity:g} "
        f"= {plan.noise_std:.4f}"),
        f"epsilon at delta={plan.delta:g}: PLD {plan.epsilon_pld:.4f}  RDP {plan.epsilon_rdp:.4f}"
        + (f"  (target {plan.target_epsilon})" if plan.target_epsilon else ""),
        f"noise source: {plan.noise_source}",
    ]
    report = {**asdict(plan)}
    if plan.mode == "local":
        report["variance"] = _local_variance(config, plan.noise_std)
        v = report["variance"]
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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from privlora import models
    from privlora.lora import attach, read_adapter
    from privlora.server import lora_spec

    name = config.model.name
    if name == models.TINY_RANDOM:
        model = models.tiny_random_llama(len(models.load_tokenizer(name)))
    else:
        hf_config = AutoConfig.from_pretrained(models.local_source(name))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        model = model.to_empty(device="cpu")
    handles = attach(model, lora_spec(config), config.seed)
    adapter = read_adapter(handles)
    n = config.federation.per_round
    # At initialisation B = 0, so the B-alpha term is 0; later rounds use the trained factors.
    rule = config.federation.aggregation
    rows = local_noise_variance(adapter, noise_std, n, lora_spec(config).scale,
                                noise_a=rule != "ffa", products_averaged=rule == "exact")
    return {**summarize(rows), "layers": [asdict(r) for r in rows[:4]]}
