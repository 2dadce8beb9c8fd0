"""Library warnings privlora cannot fix at their cause, each silenced narrowly, in one place.

Every filter names one message of one library; anything else a library says still shows.
``privlora/__init__.py`` imports this module, so every privlora process has its filters: the CLI
and the Flower ServerApp / ClientApp processes (which import ``privlora.flower.*``). Two are
applied where the library is used: ``peft_wrapping`` around PEFT's model wrapping, and
``quiet_dp_accounting`` by ``privacy.accounting`` once dp-accounting is imported.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# bitsandbytes (the nf4 extra) on a CPU with avx512_bf16: its CPU backend, when imported, tries to
# fetch a fused 4-bit matmul kernel from the Hugging Face Hub through the `kernels` package, and
# logs a warning when that package is absent. privlora runs no 4-bit matmul (an NF4 bundle is
# dequantized before use) and downloads no code, so `kernels` is not installed.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_NO_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community"

# dp-accounting's RDP accountant (through absl's logger): at small orders (alpha 1.02 ... 1.65 for
# q = 0.2, sigma = 0.49) its series does not converge and the order is left out, logged once per
# order at every epsilon computed. privlora reports PLD's epsilon and RDP's beside it; a skipped
# order only loosens RDP's. Its other warnings (a negative divergence) still show.
_ABSL_LOGGER = "absl"
_RDP_ORDER_SKIPPED = "_compute_log_a_frac failed to converge"

# PEFT (0.21.2, the newest) reads `model.is_gradient_checkpointing` on every model it wraps
# (PeftModel.__init__), a property transformers 5 deprecated with a FutureWarning. privlora never
# reads it; drop this filter once PEFT reads `is_activation_checkpointing`.
_PEFT_READS_DEPRECATED = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    """Drop the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _drop(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))


def quiet_dp_accounting() -> None:
    """Drop dp-accounting's skipped-RDP-order messages; call once dp_accounting is imported
    (absl then has made its "absl" logger, of its own class)."""
    _drop(_ABSL_LOGGER, _RDP_ORDER_SKIPPED)


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around a PeftModel's construction (get_peft_model, PeftModel.from_pretrained): hide the
    FutureWarning that PEFT's own read of `is_gradient_checkpointing` raises, and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_READS_DEPRECATED, category=FutureWarning)
        yield


# the logger exists before bitsandbytes is imported: its logging.getLogger(__name__) returns it
_drop(_BNB_CPU_LOGGER, _BNB_NO_KERNELS)
