"""Block-diffusion and AR decoding: sampling, remasking strategies, SAID, the jitted decoder."""

from sdar_jax.decode.decoder import DecodeConfig, DecodeResult, canvas_length, generate
from sdar_jax.decode.strategies import STRATEGY_NAMES

__all__ = ["DecodeConfig", "DecodeResult", "STRATEGY_NAMES", "canvas_length", "generate"]
