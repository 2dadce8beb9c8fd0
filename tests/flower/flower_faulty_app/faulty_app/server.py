"""privlora's own ServerApp, unchanged."""

from privlora.flower.server_app import app

__all__ = ["app"]
