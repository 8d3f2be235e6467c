"""Checkpoints on disk: reading headers and hashes, integrity checks, model sources, writing a loaded model."""
