"""loramix: token-level adaptation of LoRA adapters (Belofsky 2023), fast and exact."""

__version__ = "0.1.0"
