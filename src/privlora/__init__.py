"""privlora: private federated LoRA fine-tuning of causal language models.

The three calls most users need::

    import privlora
    summary = privlora.run(privlora.load_config("configs/demo.toml"), "runs/api")
    print(summary["final"]["accuracy"], summary["privacy"])
"""

# Library warnings that cannot be fixed at their cause, each silenced narrowly (privlora.quiet);
# here, so that every privlora process has the filters, the Flower app's processes included.
from privlora import quiet as _quiet  # noqa: F401


def import_peft_without_bitsandbytes() -> None:
    """Import PEFT while hiding bitsandbytes from it; afterwards bitsandbytes imports normally.

    Why: PEFT imports bitsandbytes whenever it is installed (2 s), for quantized layers privlora
    never adapts (an NF4 bundle is dequantized before LoRA is attached). Every process paid it,
    and a deployed site starts a fresh process for each Flower message.
    """
    import sys

    if "peft" in sys.modules or "bitsandbytes" in sys.modules:
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # find_spec: not installed
    try:
        import peft  # noqa: F401
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]


__version__ = "0.1.0"
__all__ = ["load_config", "run"]


def __getattr__(name: str):
    # Imported on first use, so `import privlora` (and the CLI's start) stays light.
    if name == "load_config":
        from privlora.config import load_config

        return load_config
    if name == "run":
        from privlora.simulation import run

        return run
    raise AttributeError(f"module 'privlora' has no attribute {name!r}")
