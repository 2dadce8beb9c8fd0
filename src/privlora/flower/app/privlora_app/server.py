"""The ServerApp component: privlora.flower.server_app."""

from privlora.flower.server_app import app

__all__ = ["app"]
