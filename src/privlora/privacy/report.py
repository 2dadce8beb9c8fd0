"""``privlora privacy plan``: what a config will spend, and (local mode) the noise it adds.

Runs where the data is: it may look at the clients' example counts to suggest a sample rate,
which the run itself never does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from privlora import data
from privlora.architectures import check_causal_lm
from privlora.config import load_config
from privlora.lora import Adapter, LoraSpec, attach, read_adapter, released_coordinates, spec_of
from privlora.privacy import accounting
from privlora.privacy.plan import (
    lacks_sample_rate,
    make_plan,
    predicted_signal,
    suggest_sample_rate,
)
from privlora.privacy.recipe import resolve
from privlora.privacy.signal import LEARNS, NO_LEARNING, NoiseToSignal
from privlora.privacy.variance import local_noise_variance, summarize
from privlora.quantization.bundle import model_weights
from privlora.records import signal_dict
from privlora.rules import build_rule


def plan_report(config_path: Path, overrides: list[str]) -> dict:
    """Return the plan of ``config_path`` as a dict with a human-readable ``text`` field."""
    # privacy.recipe = "auto" chooses before any data is read, from the config alone
    recipe = resolve(load_config(config_path, overrides))
    config = recipe.config
    task = data.load_task(config.data, config.seed)
    train_rows, _ = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
    parts = data.partition(train_rows, config.data, config.federation.num_clients, config.seed)
    sizes = [len(p) for p in parts]
    lines, suggested = recipe.lines(), None
    if lacks_sample_rate(config):
        suggested = suggest_sample_rate(config.train.batch_size, sizes)
        lines.append(f"suggested privacy.sample_rate = {suggested:.4g} (train.batch_size / median "
                     "client size); put it in the config: the run uses a fixed, public rate")
        config = load_config(config_path, [*overrides, f"privacy.sample_rate={suggested!r}"])
    plan = make_plan(config, sizes)
    model = _skeleton(config)
    shapes = {name: tuple(w.shape) for name, w in model_weights(model).items()}  # before LoRA
    spec = spec_of(config.lora, model)
    adapter = read_adapter(attach(model, spec, config.seed))
    wire = wire_costs(config, shapes, adapter)
    report = plan.to_dict()
    if report is None:
        return {"mode": "none", "wire": wire, "recipe": recipe.to_dict(), "text": "\n".join(
            [*lines, "privacy.mode = 'none': no privacy events, epsilon = inf",
             *_wire_lines(wire)])}
    report["recipe"] = recipe.to_dict()
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
    signal = predicted_signal(plan, released_coordinates(adapter, build_rule(config).trains_a),
                              config.federation)
    report["noise_to_signal"] = signal_dict(signal)
    lines += _signal_lines(plan, signal)
    if plan.release_mechanism() is not None:  # DP-FedLoRA: clients noise their own factors
        report["variance"] = v = _local_variance(config, spec, adapter, plan.noise_std)
        lines.append(
            "local-DP noise in the aggregated update (per round, at initialisation): "
            f"E||noise||_F^2 = {v['expected_sq_frobenius']:.4g} (cross term beta*alpha "
            f"{v['cross_term']:.4g}); max per-entry variance {v['max_per_entry_variance']:.4g}; "
            "E[update] is unbiased"
        )
    report["wire"] = wire
    report["text"] = "\n".join([*lines, *_wire_lines(wire)])
    return report


def wire_costs(config, shapes: dict[str, tuple[int, ...]], adapter: Adapter) -> dict:
    """Bytes of what crosses the wire, per layer of FedLPP, from the real shapes: the bundle's
    weights (once per client; its config and tokenizer add a few MB), one downlink and one
    uplink (as encoded, a full-rank client's), against float32."""
    from privlora.protocol import downlink
    from privlora.quantization import codec
    from privlora.quantization.bundle import predicted_bytes

    q = config.quantization
    down = downlink(build_rule(config), adapter, None)
    up_bytes, down_bytes = codec.encoded_sizes(down, q.adapter, q.uplink_bits)
    up_f32, down_f32 = codec.encoded_sizes(down, "none", 0)
    return {
        "base_scheme": q.base,
        "bundle_weights_bytes": predicted_bytes(shapes, q.base) if q.quantized_base else None,
        "full_precision_bytes": predicted_bytes(shapes, "none"),
        "adapter_scheme": q.adapter,
        "downlink_bytes": down_bytes,
        "downlink_float32_bytes": down_f32,
        "uplink_bits": q.uplink_bits,
        "uplink_bytes": up_bytes,
        "uplink_float32_bytes": up_f32,
    }


def _wire_lines(wire: dict) -> list[str]:
    """The wire costs in words; quantization is post-processing and costs no privacy."""
    full = wire["full_precision_bytes"]
    lines = []
    weights = wire["bundle_weights_bytes"]
    if weights is not None:
        lines.append(f"base model to each client, once: a {wire['base_scheme']} bundle, about "
                     f"{weights:,} bytes of weights ({weights / full:.3f}x the float32 {full:,}) "
                     "plus config and tokenizer; clients get quantized copies (norms and "
                     "tensors no block fits stay exact, and so does any weight already on the "
                     "scheme's grid: the bundle's manifest lists them)")
    lines.append(f"per client per round: down {wire['downlink_bytes']:,} bytes ({wire['adapter_scheme']}"
                 f"; float32 {wire['downlink_float32_bytes']:,}), up {wire['uplink_bytes']:,} bytes ("
                 + (f"{wire['uplink_bits']}-bit stochastic rounding after any noise, no privacy cost"
                    if wire["uplink_bits"] else "float32") + ")")
    return lines


def _signal_lines(plan, signal: NoiseToSignal) -> list[str]:
    """Say whether the noise lets the run learn, and the smallest changes that would fix it."""
    lines = [
        (f"noise-to-signal (noise norm / clip) of {signal.release}: {signal.per_release:.3g} over "
        f"{signal.coordinates:,} released coordinates"),
        (f"  whole run: {signal.whole_run:.3g} after averaging {signal.releases:g} releases "
        f"-> {signal.verdict.upper()} (learns <= {LEARNS}, too noisy > {NO_LEARNING})"),
    ]
    if signal.whole_run > LEARNS:
        needed = plan.noise_multiplier * LEARNS / signal.whole_run
        if needed < accounting.SIGMA_MIN:  # accounting that little noise is slow and useless
            budget = f"no useful epsilon (it would need sigma {needed:.3g} < {accounting.SIGMA_MIN})"
        else:
            epsilon = dataclasses.replace(plan, noise_multiplier=needed).epsilon
            budget = f"epsilon {epsilon:.3g} (sigma {needed:.3g})"
        lines.append(f"  to reach {LEARNS}, change any one of: " + "; ".join(
            [*signal.fixes(), budget]))
    return lines


def _skeleton(config):
    """The model's real layer shapes without its weights (a meta-device model, emptied)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from privlora import models

    name = config.model.name
    if name == models.TINY_RANDOM:
        model = models.tiny_random_llama(len(models.load_tokenizer(name)))
    else:
        hf_config = AutoConfig.from_pretrained(models.local_source(name))
        check_causal_lm(hf_config, name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        model = model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gives each parameter its own storage
    return model


def _local_variance(config, spec: LoraSpec, adapter: Adapter, noise_std: float) -> dict:
    """Variance report from the real layer shapes."""
    from dataclasses import asdict

    rule = build_rule(config)
    # At initialisation B = 0, so the B-alpha term is 0; later rounds use the trained factors.
    rows = local_noise_variance(adapter, noise_std, config.federation.per_round, spec.scale,
                                noise_a=rule.trains_a,
                                products_averaged=rule.averages_products)
    return {**summarize(rows), "layers": [asdict(r) for r in rows[:4]]}
