"""privlora: private federated LoRA fine-tuning of causal language models."""

__version__ = "0.1.0"
