"""The streaming generation engine: conditioning, scheduler, KV caches and the block loop."""
