"""Pure-torch diffusion policy math (no RLlib): schedules, denoiser, noise-conditioned sampler."""

from .config import DiffusionConfig
from .denoiser import DenoiserMLP
from .policy import (DiffusionPolicy, DiscreteDiffusionPolicy, categorical_log_prob, gaussian_log_prob,
                     gaussian_log_prob_elements, reduce_log_prob)
from .sampler import Chain, NoiseConditionedSampler, StepGradNorms, sampler_timesteps
from .schedules import NoiseSchedule, cosine_betas, linear_betas

__all__ = [
    "Chain",
    "DenoiserMLP",
    "DiffusionConfig",
    "DiffusionPolicy",
    "DiscreteDiffusionPolicy",
    "NoiseConditionedSampler",
    "NoiseSchedule",
    "StepGradNorms",
    "categorical_log_prob",
    "cosine_betas",
    "gaussian_log_prob",
    "gaussian_log_prob_elements",
    "reduce_log_prob",
    "linear_betas",
    "sampler_timesteps",
]
