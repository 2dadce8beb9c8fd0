"""Test-only Flower App: a site that sends malformed updates (see client.py)."""
