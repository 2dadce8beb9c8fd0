"""The ClientApp component: privlora.flower.client_app."""

from privlora.flower.client_app import app

__all__ = ["app"]
