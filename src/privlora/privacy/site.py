"""A site's own privacy budget: the site, not the server, decides what may leave it.

Each site keeps a ledger file of what it released, keyed by a fingerprint of its data, across
rounds, runs and restarts. Before each round the site computes, with its own accountant (PLD over
all its DpEvents), the cost of exactly what it will apply: its own clip, sigma, sampling rate and
steps from the mechanism it is about to run, never a number the server claims. It refuses when
the owner's policy does not accept the run's mode, when a mechanism has no noise or no clip, or
when the composed total would pass the owner's cap; otherwise it records the charge (atomically,
under a file lock) and only then trains and releases. A crash after the charge can only
overcount, as on the server.

One exception, which the policy must accept explicitly: in client mode the site's update leaves
un-noised and the server adds the noise (DP-FedAvg with a trusted server). The site then records
the Gaussian release the server's config describes, conditioned on its taking part (no credit
for sampling), marked as the server's claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting

from privlora.errors import ConfigError
from privlora.privacy import accounting
from privlora.privacy.central import CentralDP
from privlora.privacy.client_dp import LocalDP, SampleDP
from privlora.privacy.ledger import event_from_dict, event_to_dict
from privlora.run_dir import atomic_write

MODES = ("sample", "local", "client")
APPLIED = "applied at this site"
CLAIMED = "claimed by the server (client mode: the server adds the noise)"


class SiteRefused(RuntimeError):
    """The site's policy refuses this round; the message (no private data) goes to the server."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site's owner allows: a cap on the epsilon its data ever spends, at its delta; the
    privacy modes it accepts (client mode trusts the server); and whether it takes part in runs
    without DP (``allow_non_private``). With no cap, only an owner who allows non-private runs
    takes part at all (a site that lets un-noised updates out has nothing left to cap)."""

    max_epsilon: float | None = None
    delta: float | None = None
    modes: tuple[str, ...] = ("sample", "local")
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown:
            raise ConfigError(f"site.modes (node-config modes) names {unknown}; choose among "
                              f"{list(MODES)}")
        if self.max_epsilon is not None:
            if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
                raise ConfigError(f"site.max_epsilon (node-config max-epsilon) = "
                                  f"{self.max_epsilon} must be a number > 0")
            if self.delta is None:
                raise ConfigError("site.max_epsilon (node-config max-epsilon) is set without its "
                                  "delta; set site.delta (node-config delta) too "
                                  "(e.g. delta = 1e-5): an epsilon means nothing without it")
        if self.delta is not None:
            accounting.validate_probability(self.delta, "site.delta (node-config delta)")

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> SitePolicy:
        """Read a SuperNode's ``--node-config``: ``max-epsilon``, ``delta``, ``modes`` (a
        comma-separated list, default "sample,local") and ``allow-non-private``."""
        modes = tuple(m.strip() for m in str(node.get("modes", "sample,local")).split(",")
                      if m.strip())
        try:
            return cls(max_epsilon=_number(node, "max-epsilon"), delta=_number(node, "delta"),
                       modes=modes, allow_non_private=_flag(node, "allow-non-private"))
        except ConfigError as err:
            raise ConfigError(f"node-config: {err}") from None


def _number(node: Mapping[str, Any], key: str) -> float | None:
    if key not in node:
        return None
    try:
        return float(node[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{key} = {node[key]!r} must be a number") from None


def _flag(node: Mapping[str, Any], key: str) -> bool:
    value = node.get(key, False)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"{key} = {value!r} must be true or false")


@dataclass(frozen=True)
class Release:
    """What one round at a site will let out, as the site's own mechanism defines it."""

    mode: str  # "sample", "local", "client" or "none"
    event: dp_accounting.DpEvent
    source: str  # APPLIED, or CLAIMED in client mode
    reproducible: bool  # seeded noise: the same round from the same downlink releases the same


def release_of(steps: int, sample_dp: SampleDP | None, local_dp: LocalDP | None,
               server_dp: CentralDP | None) -> Release:
    """Return what a round of ``steps`` local steps with these mechanisms releases.

    Raises SiteRefused for a mechanism without noise or without a clip: nothing could be capped.
    """
    if sample_dp is not None:
        _check_mechanism(sample_dp.noise_multiplier, sample_dp.clip)
        return Release("sample", accounting.sample_mode_event(
            sample_dp.sample_rate, sample_dp.noise_multiplier, steps), APPLIED,
            not sample_dp.secure)
    if local_dp is not None:
        _check_mechanism(local_dp.noise_multiplier, local_dp.clip)
        return Release("local", accounting.local_mode_event(local_dp.noise_multiplier, 1),
                       APPLIED, not local_dp.secure)
    if server_dp is not None:
        _check_mechanism(server_dp.noise_std / server_dp.clip if server_dp.clip > 0 else 0.0,
                         server_dp.clip)
        # taking part is known to the site: no credit for the server's sampling
        return Release("client", accounting.local_mode_event(
            server_dp.noise_std / server_dp.clip, 1), CLAIMED, not server_dp.secure)
    return Release("none", dp_accounting.NonPrivateDpEvent(), APPLIED, True)


def _check_mechanism(sigma: float, clip: float) -> None:
    if not (math.isfinite(clip) and clip > 0):
        raise SiteRefused(f"the run's clip = {clip} bounds nothing; this site releases only "
                          "clipped updates")
    if not (math.isfinite(sigma) and sigma > 0):
        raise SiteRefused(f"the run's noise multiplier = {sigma} adds no noise; this site "
                          "releases only noised updates")


def fingerprint(path: Path) -> str:
    """Return the SHA-256 of a data file: the key under which the site's spend is kept. It
    stays in the site's own ledger file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SiteBudget:
    """A site's policy and the ledger file that remembers what its data ``dataset`` spent."""

    policy: SitePolicy
    ledger: Path
    dataset: str  # fingerprint of the site's data

    def spend(self, release: Release, run: str, round_: int, downlink: str) -> float:
        """Refuse (SiteRefused) or record ``release`` for (``run``, ``round_``); return the
        site's epsilon after it. ``downlink`` is the digest of what the server sent: a round
        repeated from the same downlink with reproducible noise releases the same values
        again, which reveals nothing new, so it is not charged twice."""
        self._admit(release)
        with _locked(self.ledger):
            book = read_ledger(self.ledger)
            entries = book["datasets"].setdefault(self.dataset, [])
            repeat = release.reproducible and any(
                e["run"] == run and e["round"] == round_ and e["downlink"] == downlink
                for e in entries)
            events = [event_from_dict(e["event"]) for e in entries]
            if not repeat:
                events.append(release.event)
            total = site_epsilon(events, self.policy.delta)
            cap = self.policy.max_epsilon
            if release.mode != "none" and cap is not None and total > cap * (1 + 1e-9):
                raise SiteRefused(
                    f"this round would bring the site's epsilon to {total:.3f} at delta "
                    f"{self.policy.delta} (its ledger over all runs), over its max-epsilon = "
                    f"{cap}; the site releases nothing more from this data")
            if not repeat:
                entries.append({"run": run, "round": round_, "mode": release.mode,
                                "source": release.source, "downlink": downlink,
                                "event": event_to_dict(release.event)})
                book["delta"] = self.policy.delta
                _write(self.ledger, book)
        return total

    def _admit(self, release: Release) -> None:
        p = self.policy
        if release.mode == "none":
            if not p.allow_non_private:
                raise SiteRefused("the run is not private (privacy.mode = 'none') and this "
                                  "site's node-config does not set allow-non-private = true")
            return
        if release.mode not in p.modes:
            raise SiteRefused(f"privacy.mode = {release.mode!r} is not among the modes this "
                              f"site accepts ({', '.join(p.modes)}; node-config modes)")
        if p.max_epsilon is None and not p.allow_non_private:
            raise SiteRefused("this site has no max-epsilon and delta in its node-config; its "
                              "owner must set them before any private run is accepted")



def site_epsilon(events: Sequence[dp_accounting.DpEvent], delta: float | None) -> float:
    """Return the PLD epsilon of ``events`` at ``delta``: inf once anything left un-noised, nan
    without a delta to state it at (a site with no cap)."""
    if any(isinstance(e, dp_accounting.NonPrivateDpEvent) for e in events):
        return math.inf
    if not events:
        return 0.0
    if delta is None:
        return math.nan
    return accounting.epsilon(accounting.compose(events), delta, "pld")


def read_ledger(path: Path) -> dict[str, Any]:
    """Return a site ledger file's content (an empty ledger when the file is absent)."""
    if not path.exists():
        return {"format": 1, "delta": None, "datasets": {}}
    try:
        book = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        book = None
    if not (isinstance(book, dict) and isinstance(book.get("datasets"), dict)):
        raise ConfigError(f"site ledger {path} is not a privlora site ledger; restore it from a "
                          "backup: the site's spend cannot be known without it")
    return book


def spend_by_run(path: Path, delta: float | None = None) -> list[dict[str, Any]]:
    """Return, per dataset and run, the rounds released and the epsilon they spent, then each
    dataset's total: what ``privlora site budget`` prints."""
    book = read_ledger(path)
    delta = delta if delta is not None else book.get("delta")
    if delta is None:
        raise ConfigError(f"site ledger {path} records no delta; pass --delta")
    rows = []
    for dataset, entries in book["datasets"].items():
        runs: dict[str, list[dict]] = {}
        for e in entries:
            runs.setdefault(e["run"], []).append(e)
        for run, mine in runs.items():
            rows.append({"dataset": dataset, "run": run, "rounds": len(mine),
                         "modes": sorted({e["mode"] for e in mine}),
                         "epsilon": site_epsilon([event_from_dict(e["event"]) for e in mine], delta)})
        rows.append({"dataset": dataset, "run": "total", "rounds": len(entries),
                     "modes": sorted({e["mode"] for e in entries}),
                     "epsilon": site_epsilon([event_from_dict(e["event"]) for e in entries],
                                            delta)})
    return rows


def _write(path: Path, book: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(book, indent=1))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` (two runs at one site charge one at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
