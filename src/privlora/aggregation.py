"""Aggregate clients' LoRA adapters on the server: pure functions, inputs never mutated.

The math of three rules (``privlora.rules`` holds one object per rule that applies it):

- ``fedavg``: average A and B separately. Cheap and what the papers and FlowerTune do, but
  inexact: mean(B) @ mean(A) != mean(B @ A) in general (``factor_product_gap`` measures by how much).
- ``ffa``: FFA-LoRA keeps A frozen and shared, so averaging B alone is exact.
- ``exact``: average the products B @ A, then refactorize with a truncated SVD (FlexLoRA-style);
  exact whenever the averaged update has rank <= r. The server computes it as the global product
  plus the weighted mean of each client's change of its product (``product_change``): the same
  for equal ranks, and with mixed ranks a low-rank client moves the global update only by what
  it learned.

Math runs in float32; the SVD runs in float64 (the matrices are at most hidden x hidden).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from privlora.errors import ConfigError, InvalidUpdate
from privlora.lora import Adapter, Factors, wire_name


def normalise_weights(weights: Sequence[float]) -> list[float]:
    """Scale positive, finite client weights (e.g. sample counts) so that they sum to 1."""
    values = [float(w) for w in weights]
    if not values:
        raise InvalidUpdate("aggregation weights are empty; pass one positive weight per client")
    bad = [w for w in values if not math.isfinite(w) or w <= 0.0]
    if bad:
        raise InvalidUpdate(
            f"aggregation weights must be positive and finite, got {bad[:3]} in {values[:8]}; "
            "weight clients by their (non-zero) number of training examples"
        )
    total = math.fsum(values)
    return [w / total for w in values]


def _check_clients(adapters: Sequence[Adapter], weights: Sequence[float]) -> list[float]:
    """Validate names, factor shapes and values across clients; return normalised weights."""
    if not adapters:
        raise InvalidUpdate("no client adapters to aggregate; at least one client must report")
    if len(weights) != len(adapters):
        raise InvalidUpdate(
            f"got {len(weights)} weights for {len(adapters)} adapters; pass one weight per client"
        )
    names = set(adapters[0])
    for k, adapter in enumerate(adapters):
        if set(adapter) != names:
            missing = sorted(names - set(adapter))[:3]
            extra = sorted(set(adapter) - names)[:3]
            raise InvalidUpdate(
                f"client {k} adapts different layers than client 0: missing {missing}, "
                f"extra {extra}; every client must use the same lora.target_modules"
            )
        for name, f in adapter.items():
            _check_factors(f, name, k, adapters[0][name])
    return normalise_weights(weights)


def _check_factors(f: Factors, name: str, k: int, ref: Factors) -> None:
    """Check one client's factors: 2-D, inner ranks agree, (out, in) as client 0, all finite."""
    if f.A.dim() != 2 or f.B.dim() != 2 or f.B.shape[1] != f.A.shape[0]:
        raise InvalidUpdate(
            f"client {k} layer {name!r}: B {tuple(f.B.shape)} @ A {tuple(f.A.shape)} is not a "
            "valid LoRA pair; expected B (out, r) and A (r, in)"
        )
    if (f.B.shape[0], f.A.shape[1]) != (ref.B.shape[0], ref.A.shape[1]):
        raise InvalidUpdate(
            f"client {k} layer {name!r}: update shape {(f.B.shape[0], f.A.shape[1])} differs from "
            f"client 0's {(ref.B.shape[0], ref.A.shape[1])}; all clients must share the base model"
        )
    if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
        raise InvalidUpdate(
            f"client {k} layer {name!r} holds NaN or inf; drop that client's update "
            "(lower the learning rate or enable clipping)"
        )


def _check_equal_ranks(adapters: Sequence[Adapter], rule: str) -> None:
    """Refuse factor averaging when clients' factor shapes (ranks) differ."""
    for name, ref in adapters[0].items():
        for adapter in adapters[1:]:
            f = adapter[name]
            if f.A.shape != ref.A.shape or f.B.shape != ref.B.shape:
                raise InvalidUpdate(
                    f"{rule} cannot average factors of different ranks "
                    f"(r={ref.A.shape[0]} vs r={f.A.shape[0]}) in layer {name!r}; "
                    "use aggregation = 'exact'"
                )


def _weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Return sum_k w_k * t_k in float32 (weights already normalised)."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights, strict=True):
        out += w * t.float()
    return out


def fedavg(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Average A and B separately: A = sum_k w_k A_k, B = sum_k w_k B_k.

    FedAvg (McMahan et al., AISTATS 2017, Algorithm 1) applied to each LoRA factor, as in
    FlowerTune. Requires equal ranks; the product of the means is not the mean of the products.
    """
    w = _check_clients(adapters, weights)
    _check_equal_ranks(adapters, "fedavg")
    return {
        name: Factors(
            A=_weighted_mean([a[name].A for a in adapters], w),
            B=_weighted_mean([a[name].B for a in adapters], w),
        )
        for name in adapters[0]
    }


def ffa(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Keep the shared frozen A and average B: exact, since sum_k w_k B_k A = (sum_k w_k B_k) A.

    FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024):
    A is fixed at its seeded initialisation on every client, so only B is trained and averaged.
    """
    w = _check_clients(adapters, weights)
    _check_equal_ranks(adapters, "ffa")
    for name, ref in adapters[0].items():
        for k, adapter in enumerate(adapters[1:], start=1):
            if not torch.equal(adapter[name].A, ref.A):
                raise InvalidUpdate(
                    f"ffa needs the same frozen A on every client, but client {k} layer {name!r} "
                    "differs from client 0; freeze A (train_a=False) with one shared lora seed, "
                    "or use aggregation = 'exact'"
                )
    return {
        name: Factors(A=ref.A.float().clone(), B=_weighted_mean([a[name].B for a in adapters], w))
        for name, ref in adapters[0].items()
    }


def mean_products(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    scales: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Return per layer the averaged weight update sum_k w_k * s_k * B_k @ A_k, shape (out, in).

    The exact average of the clients' updates (the quantity FlexLoRA, Bai et al., NeurIPS 2024,
    aggregates); ranks r_k may differ between clients. ``scales`` s_k default to 1.
    """
    w = _check_clients(adapters, weights)
    s = [1.0] * len(adapters) if scales is None else [float(x) for x in scales]
    if len(s) != len(adapters) or not all(math.isfinite(x) and x > 0 for x in s):
        raise InvalidUpdate(
            f"scales {s[:8]} must hold one positive finite LoRA scale (alpha / r) per client "
            f"({len(adapters)} clients)"
        )
    products: dict[str, torch.Tensor] = {}
    for name in adapters[0]:
        # (out, r_k) @ (r_k, in) -> (out, in), summed over clients
        terms = [a[name].B.float() @ a[name].A.float() for a in adapters]
        products[name] = _weighted_mean(terms, [wk * sk for wk, sk in zip(w, s, strict=True)])
    return products


def product_change(start: Adapter, end: Adapter, scale: float) -> dict[str, torch.Tensor]:
    """Return per layer scale * (B_end @ A_end - B_start @ A_start): a client's update, (out, in).

    Measured from the client's own start, so it is the same quantity whatever the client's rank.
    """
    before = mean_products([start], [1.0], [scale])
    after = mean_products([end], [1.0], [scale])
    if set(before) != set(after):
        raise InvalidUpdate(
            f"client adapter layers {sorted(after)[:3]} differ from its start's "
            f"{sorted(before)[:3]}; a client must return factors for the layers it received"
        )
    return {name: after[name] - before[name] for name in before}


def weighted_sum(
    updates: Iterable[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Return sum_k w_k * u_k over flat tensor dicts, consuming ``updates`` one at a time.

    ``updates`` may be a generator, so only one client's tensors need be held besides the sum.
    ``weights`` are used as given (normalise them first for a mean).
    """
    total: dict[str, torch.Tensor] | None = None
    for k, (update, w) in enumerate(zip(updates, weights, strict=True)):
        if total is None:
            total = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in update.items()}
        if set(update) != set(total):
            raise InvalidUpdate(
                f"the update at position {k} has tensors {sorted(update)[:3]}, but the first "
                f"had {sorted(total)[:3]}; every update must cover the same tensors"
            )
        total = {name: t + w * update[name].float() for name, t in total.items()}
    if total is None:
        raise InvalidUpdate("no client updates to sum; at least one client must report")
    return total


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora.rank = {rank!r} is not a positive integer; use e.g. 8")


def _refactorize_one(W: torch.Tensor, rank: int, scale: float) -> tuple[Factors, float]:
    """Split W into B (out, rank), A (rank, in) with scale * B @ A = best rank-`rank` approx."""
    out_dim, in_dim = W.shape
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)  # (out,k), (k,), (k,in)
    kept = min(rank, S.numel())
    root = S[:kept].sqrt() / math.sqrt(scale)
    B = torch.zeros(out_dim, rank, dtype=torch.float64, device=W.device)
    A = torch.zeros(rank, in_dim, dtype=torch.float64, device=W.device)
    B[:, :kept] = U[:, :kept] * root  # (out, kept) * (kept,) -> (out, kept)
    A[:kept] = root[:, None] * Vh[:kept]  # (kept, 1) * (kept, in) -> (kept, in)
    total = S.square().sum()
    # Eckart-Young: ||W - W_r||_F^2 is the sum of the discarded squared singular values
    residual = (S[kept:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return Factors(A=A.float(), B=B.float()), residual


def refactorize(
    products: dict[str, torch.Tensor], rank: int, scale: float = 1.0
) -> tuple[Adapter, dict[str, float]]:
    """Factor each update W by truncated SVD: B = U_r S_r^1/2 / sqrt(s), A = S_r^1/2 V_r^T / sqrt(s).

    Then s * B @ A = U_r S_r V_r^T, the best rank-r approximation in Frobenius norm
    (Eckart-Young); FlexLoRA (Bai et al., NeurIPS 2024) redistributes the update this way.
    Returns the adapter and per layer the relative residual ||W - W_r||_F / ||W||_F (0 if W = 0).
    Ranks beyond min(out, in) are zero-padded so the shapes are always (out, r) and (r, in).
    """
    _check_rank(rank)
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"LoRA scale = {scale!r} must be positive and finite (alpha / rank)")
    adapter: Adapter = {}
    residuals: dict[str, float] = {}
    for name, W in products.items():
        if W.dim() != 2:
            raise InvalidUpdate(f"layer {name!r}: update has shape {tuple(W.shape)}, not (out, in)")
        adapter[name], residuals[name] = _refactorize_one(W, rank, scale)
    return adapter, residuals


def exact(
    global_products: dict[str, torch.Tensor],
    mean_change: dict[str, torch.Tensor],
    rank: int,
    scale: float,
) -> tuple[Adapter, dict[str, float]]:
    """Add the clients' mean product change to the global product; refactorize at ``rank``.

    ``global_products`` is scale * B A of the global adapter per layer and ``mean_change`` the
    (weighted, or noisy) mean of the clients' ``product_change``. With equal ranks the sum is
    the weighted mean of the clients' products (FlexLoRA, Bai et al., NeurIPS 2024). Returns the
    adapter and the per-layer truncation residual (see ``refactorize``).
    """
    if set(global_products) != set(mean_change):
        raise InvalidUpdate(
            f"mean change covers layers {sorted(mean_change)[:3]}, the global product "
            f"{sorted(global_products)[:3]}; every client must update the layers it received"
        )
    total = {name: global_products[name] + mean_change[name] for name in global_products}
    return refactorize(total, rank, scale)


def factor_product_gap(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, float]:
    """Return per layer ||mean(B) mean(A) - mean(B A)||_F / ||mean(B A)||_F: fedavg's error.

    0.0 where the mean product is zero. Only defined for clients of equal rank.
    """
    w = _check_clients(adapters, weights)
    _check_equal_ranks(adapters, "factor_product_gap")
    averaged = fedavg(adapters, w)
    products = mean_products(adapters, w)
    gaps: dict[str, float] = {}
    for name, target in products.items():
        # (out, r) @ (r, in) -> (out, in)
        diff = averaged[name].B @ averaged[name].A - target
        denom = torch.linalg.matrix_norm(target.double()).item()
        gaps[name] = torch.linalg.matrix_norm(diff.double()).item() / denom if denom > 0 else 0.0
    return gaps


def truncate_rank(adapter: Adapter, rank: int) -> Adapter:
    """Zero components >= ``rank`` (rows of A, columns of B), keeping shapes: a rank-r_k share.

    On SVD-ordered factors (as ``refactorize`` returns) this is the best rank-r_k approximation,
    which is how FlexLoRA (Bai et al., NeurIPS 2024) hands each client its share of the global
    update. Returns copies; ``rank`` >= the current rank leaves the values unchanged.
    """
    _check_rank(rank)
    out: Adapter = {}
    for name, f in adapter.items():
        A, B = f.A.clone(), f.B.clone()
        A[rank:] = 0.0  # (r, in): rows beyond rank
        B[:, rank:] = 0.0  # (out, r): columns beyond rank
        out[name] = Factors(A=A, B=B)
    return out


def apply_delta(start: Adapter, delta: dict[str, torch.Tensor]) -> Adapter:
    """Return a client's factors: ``start`` plus its flat ``delta`` (wire names).

    Factors absent from ``delta`` are kept (FFA's frozen A). A rank-r client's delta covers its
    first r components; its start had the rest zeroed, so they are zero here.
    """
    adapter = {}
    for name, f in start.items():
        a_delta, b_delta = delta.get(wire_name(name, "A")), delta.get(wire_name(name, "B"))
        rank = (a_delta.shape[0] if a_delta is not None else
                b_delta.shape[1] if b_delta is not None else f.A.shape[0])
        a, b = f.A.clone(), f.B.clone()
        a[rank:], b[:, rank:] = 0, 0
        if a_delta is not None:
            a[:rank] += a_delta
        if b_delta is not None:
            b[:, :rank] += b_delta
        adapter[name] = Factors(A=a, B=b)
    return adapter
