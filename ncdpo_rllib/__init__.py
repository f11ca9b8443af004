"""ncdpo-rllib: NCDPO (PPO through all denoising steps of a diffusion policy) on Ray RLlib."""

__version__ = "0.1.0"
