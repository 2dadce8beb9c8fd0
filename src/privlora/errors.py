"""The few domain errors privlora raises; each message names the field, the bad value and the fix."""


class ConfigError(ValueError):
    """A run configuration or command-line value is invalid."""


class DataError(ValueError):
    """A data file is missing, empty or malformed, or cannot feed the requested clients."""


class PrivacyBudgetExceeded(RuntimeError):
    """Spending the next privacy event would take epsilon past the configured target."""


class InvalidUpdate(ValueError):
    """A client update has the wrong names, shapes or values for the chosen aggregation rule."""


class BundleError(ValueError):
    """A quantized model bundle is missing, damaged, or does not match its manifest."""


class RoundFailed(RuntimeError):
    """Too few clients of a round answered with an acceptable update (federation.min_clients)."""
