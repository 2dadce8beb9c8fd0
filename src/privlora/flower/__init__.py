"""The Flower deployment runtime: a ServerApp and a ClientApp over the round protocol.

The ServerApp runs ``rounds.run_rounds``, the simulation's round loop, with ``FlowerTransport``
in place of the in-process wire; the ClientApp runs ``client.run_round``. Payloads travel as
named arrays (``wire``); nothing is pickled. ``local`` starts a SuperLink and SuperNodes on
127.0.0.1 for ``privlora flower local``.
"""

from pathlib import Path


def app_dir() -> Path:
    """Return the Flower App directory (``flwr run <it> <connection>``)."""
    return Path(__file__).resolve().parent / "app"
