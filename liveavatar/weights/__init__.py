"""Checkpoint layout, sharded loading, LoRA merging and hub downloads."""
