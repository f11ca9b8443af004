"""NCDPO's and DPPO's algorithm defaults, in one place: ``NCDPOConfig`` / ``DPPOConfig`` start from
them and the experiment file's ``ppo`` section (``docs/configuration.md``) shows the same values.

RLlib's PPO defaults (lambda 1.0, 30 epochs, lr 5e-5, KL loss on, clip 0.3, one optimizer) are
tuned for MLPs; these are the ones ``../shared/NCDPO.md`` measured to learn. Light on purpose (no
RLlib import), so that the config schema can read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class AlgorithmDefaults:
    """Named as RLlib's AlgorithmConfig attributes (``lambda_``, ``train_batch_size_per_learner``)."""

    lr: float = 3e-4
    critic_lr: Optional[float] = 1e-3
    gamma: float = 0.99
    lambda_: float = 0.95
    clip_param: float = 0.2
    vf_clip_param: Optional[float] = None  # no clip: RLlib's 10 (on the SQUARED error) zeroes a fresh
    # critic's gradient wherever |value error| > 3.2, i.e. on the returns of most tasks
    entropy_coeff: float = 0.0
    num_epochs: int = 10
    minibatch_size: int = 128
    train_batch_size_per_learner: int = 4000
    actor_grad_clip: Optional[float] = 0.5
    critic_grad_clip: Optional[float] = 0.5
    target_kl: Optional[float] = None
    critic_hidden: tuple[int, ...] = (256, 256)
    critic_warmup_iters: int = 0
    kl_to_reference: float = 0.0
    logp_reduction: str = "sum"
    logp_clamp: Optional[tuple[float, float]] = None
    advantage_normalization: str = "batch"
    advantage_clip_quantiles: Optional[tuple[float, float]] = None
    reward_scale_running: bool = False
    # DPPO only
    gamma_denoise: float = 0.99
    clip_param_base: Optional[float] = None
    clip_param_rate: float = 3.0


DEFAULTS = AlgorithmDefaults()
DPPO_ONLY = ("gamma_denoise", "clip_param_base", "clip_param_rate")

APPO_DEFAULTS = {
    "rollout_fragment_length": 64,  # env steps per env per sample() call (V-trace's time axis); divides 128
    "circular_buffer_num_batches": 8,  # batches the learner's queue holds (the oldest is dropped when full)
    "circular_buffer_iterations_per_batch": 1,  # times the learner may train on one batch
    "target_network_update_freq": 2,  # RLlib's APPO default
    "broadcast_interval": 1,  # learner updates between weight pushes to the EnvRunners
    "max_requests_in_flight_per_learner": 3,  # RLlib's: batches sent to a remote learner, not yet answered
    "timeout_s_sampler_manager": 0.1,  # the driver's wait for a runner's batch (RLlib's 0.0 spins a core)
}
"""The asynchronous path's own settings (``NCDPOAPPOConfig``; the experiment file's ``appo``
section and ``resources.learner_queue_batches`` / ``broadcast_interval``), named as RLlib's
APPOConfig attributes. Everything else is ``DEFAULTS``, PPO's epochs and minibatches included:
RLlib's APPO default of one whole-batch gradient step per batch (x2 reuse) left NCDPO at a random
policy's return on InvertedPendulum-v5 after 30k env steps (4.6), 10 epochs of 128-row minibatches
reached 137 (tests/test_learning.py's setting, 2026-12-03)."""
