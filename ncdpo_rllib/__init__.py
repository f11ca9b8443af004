"""ncdpo-rllib: NCDPO (PPO through all denoising steps of a diffusion policy) on Ray RLlib."""

__version__ = "0.1.0"

from .policy_file import load_policy  # noqa: E402,F401  (torch or onnxruntime only: no Ray)
