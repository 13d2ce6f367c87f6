"""Checkpoints: orbax manager, name maps and released-format conversion."""
