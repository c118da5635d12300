"""sdar_jax: SDAR block-diffusion language models in JAX/Flax."""
