"""The privacy ledger: which DpEvents each party (a client id, or "global") has spent.

The ledger is the only state in privacy accounting. It is saved beside every run and checkpoint
as JSON (events in dp-accounting's own named-tuple form) and epsilon is always recomputed from
the recorded events, never trusted from the file.
"""

from __future__ import annotations

import json
import math
from typing import Any

from dp_accounting import dp_event as dp_event_module

from privlora.errors import ConfigError
from privlora.privacy.accounting import (
    Accountant,
    DpEvent,
    compose,
    epsilon,
    validate_probability,
)

_WOULD_EXCEED_SLACK = 1e-9


def event_to_dict(event: DpEvent) -> dict[str, Any]:
    """Return a JSON-serialisable dict of `event`: {"type": class name, **fields}, recursively."""
    return _tuple_to_json(event.to_named_tuple())


def _tuple_to_json(value: Any) -> Any:
    """Convert dp-accounting's NamedTuple form (nested events, lists) to plain JSON values."""
    if isinstance(value, dp_event_module.DpEventNamedTuple):
        fields = [f for f in value._fields if f not in ("module_name", "class_name")]
        return {"type": value.class_name, **{f: _tuple_to_json(getattr(value, f)) for f in fields}}
    if isinstance(value, list | tuple):
        return [_tuple_to_json(v) for v in value]
    return value


def event_from_dict(data: dict[str, Any]) -> DpEvent:
    """Return the DpEvent that `event_to_dict` produced `data` from."""
    name = data.get("type") if isinstance(data, dict) else None
    cls = getattr(dp_event_module, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, DpEvent)):
        raise ConfigError(
            f"ledger event type = {name!r} is not a dp_accounting DpEvent class; "
            "the ledger file is corrupt or from an incompatible dp-accounting version"
        )
    kwargs = {k: _json_to_value(v) for k, v in data.items() if k != "type"}
    return cls(**kwargs)


def _json_to_value(value: Any) -> Any:
    """Invert `_tuple_to_json` for one field value."""
    if isinstance(value, list):
        return [_json_to_value(v) for v in value]
    return event_from_dict(value) if isinstance(value, dict) else value


def _json_number(x: float) -> float | str:
    """Return `x`, or the string "inf" (strict JSON has no infinity)."""
    return x if math.isfinite(x) else "inf"


class PrivacyLedger:
    """Record the DpEvents each party (a client id, or "global") has spent; report epsilon.

    The ledger is the only state in privacy accounting: epsilon is always recomputed from the
    recorded events (with a per-instance cache keyed on the composed history).
    """

    def __init__(self, delta: float, neighbouring: str, noise_source: str | None = None) -> None:
        """Start an empty ledger at `delta` under the `neighbouring` relation (human text).

        ``noise_source`` says where the noise came from (the OS CSPRNG, or a seed that voids
        the epsilon against anyone who knows it); it is saved with the events.
        """
        validate_probability(delta, "privacy.delta")
        if not isinstance(neighbouring, str) or not neighbouring.strip():
            raise ConfigError(
                f"neighbouring = {neighbouring!r} must describe the neighbouring relation, "
                "e.g. 'add/remove one example' or 'add/remove one client'"
            )
        self.delta = float(delta)
        self.neighbouring = neighbouring
        self.noise_source = noise_source
        self._events: dict[str, list[DpEvent]] = {}
        self._cache: dict[tuple[str, str], float] = {}  # (history as JSON, accountant) -> eps

    def record(self, party: str, event: DpEvent) -> None:
        """Append `event` to what `party` has spent."""
        if not isinstance(party, str) or not party:
            raise ConfigError(f"party = {party!r} must be a non-empty client id or 'global'")
        if not isinstance(event, DpEvent):
            raise TypeError(f"event = {event!r} must be a dp_accounting.DpEvent")
        self._events.setdefault(party, []).append(event)

    def parties(self) -> list[str]:
        """Return the parties that have recorded events, in first-seen order."""
        return list(self._events)

    def events(self, party: str) -> list[DpEvent]:
        """Return a copy of the events `party` has spent (empty if none)."""
        return list(self._events.get(party, []))

    def epsilon(self, party: str | None = None, accountant: Accountant = "pld") -> float:
        """Return epsilon spent by `party`, or the max over parties when None (0.0 if none)."""
        if party is None:
            return max((self.epsilon(p, accountant) for p in self._events), default=0.0)
        return self._epsilon_of(self._events.get(party, []), accountant)

    def would_exceed(
        self, party: str, event: DpEvent, target_epsilon: float, accountant: Accountant = "pld"
    ) -> bool:
        """Return whether recording `event` for `party` would take epsilon past the target."""
        eps = self._epsilon_of([*self._events.get(party, []), event], accountant)
        return eps > target_epsilon * (1.0 + _WOULD_EXCEED_SLACK)

    def _epsilon_of(self, events: list[DpEvent], accountant: Accountant) -> float:
        """Epsilon of composing ``events``, computed once per distinct history.

        Why: with many clients most parties share one history (say every client in every round),
        and each PLD/RDP evaluation costs about 0.1 s.
        """
        composed = compose(events)
        key = (json.dumps(event_to_dict(composed), sort_keys=True), accountant)
        if key not in self._cache:
            self._cache[key] = epsilon(composed, self.delta, accountant)
        return self._cache[key]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict: delta, relation, events per party, epsilon summary."""
        summary: dict[str, Any] = {}
        for acc in ("pld", "rdp"):
            per_party = {p: _json_number(self.epsilon(p, acc)) for p in self._events}
            summary[acc] = {"max": _json_number(self.epsilon(None, acc)), "per_party": per_party}
        return {
            "delta": self.delta,
            "neighbouring": self.neighbouring,
            "noise_source": self.noise_source,
            "events": {p: [event_to_dict(e) for e in evs] for p, evs in self._events.items()},
            "epsilon": summary,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """Return the ledger that `to_dict` produced `data` from (the summary is recomputed)."""
        try:
            ledger = cls(delta=data["delta"], neighbouring=data["neighbouring"],
                         noise_source=data.get("noise_source"))
            parties = data["events"]
        except (KeyError, TypeError) as err:
            raise ConfigError(
                f"ledger is missing field {err}; expected keys delta, neighbouring, events"
            ) from err
        for party, events in parties.items():
            for event in events:
                ledger.record(party, event_from_dict(event))
        return ledger
