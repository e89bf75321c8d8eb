"""Neural network modules: the S2V diffusion transformer, the Wan2.1 VAE, umT5 and wav2vec2 encoders."""
