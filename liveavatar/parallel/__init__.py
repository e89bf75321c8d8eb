"""Multi-device execution of the engine (timestep-forcing pipeline parallelism)."""
