"""privlora: private federated LoRA fine-tuning of causal language models.

The three calls most users need::

    import privlora
    summary = privlora.run(privlora.load_config("configs/demo.toml"), "runs/api")
    print(summary["final"]["accuracy"], summary["privacy"])
"""

__version__ = "0.1.0"
__all__ = ["load_config", "run"]


def __getattr__(name: str):
    # Imported on first use, so `import privlora` (and the CLI's start) stays light.
    if name == "load_config":
        from privlora.config import load_config

        return load_config
    if name == "run":
        from privlora.server import run

        return run
    raise AttributeError(f"module 'privlora' has no attribute {name!r}")
