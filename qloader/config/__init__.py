"""Config schemas and composing them with Hydra; no torch, no transformers."""
