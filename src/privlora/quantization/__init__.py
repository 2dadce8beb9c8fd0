"""FedLPP: what crosses the wire quantized (the base-model bundle, the adapter, the uplink)."""
