"""Every knob of the diffusion policy, in one typed place.

Defaults are what ``../shared/NCDPO.md`` section 3 measured to learn from scratch:
x0-prediction, a linear schedule to beta 0.2, no x0 clip, K = 5, a learned final-step
std starting at 1.0 (as RLlib's MLP PPO explores). For fine-tuning a pre-trained
(behaviour-cloned) policy, start the std small (``init_std: 0.1``) instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional


@dataclass
class DiffusionConfig:
    """The diffusion policy: chain, denoiser network and final-step Gaussian."""

    # --- chain -------------------------------------------------------------------
    denoising_steps: int = 5
    """K: diffusion steps of the schedule (and of the sampler unless ``ddim_steps``)."""
    prediction: Literal["x0", "epsilon"] = "x0"
    """What the denoiser predicts. x0 is needed from scratch (epsilon amplifies the noise)."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Noise schedule; cosine with few steps makes 1/sqrt(abar_K) huge for epsilon-prediction."""
    beta_min: float = 1e-4
    """First beta of the linear schedule."""
    beta_max: float = 0.2
    """Last beta of the linear schedule."""
    cosine_beta_clip: float = 0.999
    """Upper clip of the cosine schedule's betas (Nichol & Dhariwal's 0.999)."""
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    """Reverse process; ddim can skip steps (``ddim_steps``)."""
    ddim_steps: Optional[int] = None
    """DDIM only: sample with this many steps (a subsequence of the K); None = K."""
    ddim_eta: float = 1.0
    """DDIM only: 1.0 reproduces DDPM's variance, 0.0 is deterministic before the floor."""
    x0_clip: Optional[float] = None
    """Clip the predicted clean action to [-c, c]; None = no clip."""
    x0_clip_mode: Literal["hard", "soft"] = "soft"
    """hard = clamp (zero gradient when saturated); soft = c * tanh(x / c)."""
    noise_clip: Optional[float] = 3.0
    """Clip the initial noise x_K to [-c, c]; None = no clip."""
    sigma_min: float = 0.1
    """Floor on the std of the intermediate denoising steps when sampling (DPPO's
    ``min_sampling_denoising_std``, 0.1)."""
    logprob_sigma_min: Optional[float] = None
    """DPPO: floor on each denoising step's std when scoring its log-prob (the reference's
    ``min_logprob_denoising_std``); null = sigma_min."""
    eval_sigma_min: Optional[float] = None
    """Floor on the intermediate steps' std at evaluation (``explore=False``); null = sigma_min.
    DPPO's reference evaluates DDPM chains with 0.001 (the schedule's own variance)."""
    eval_ddim_eta: Optional[float] = None
    """DDIM: eta at evaluation; null = ddim_eta. DPPO's reference trains with eta 1 and
    evaluates with 0."""
    finetune_steps: Optional[int] = None
    """Backpropagate only through the last N sampler steps (earlier ones run without
    grad); None = all steps, which is NCDPO proper."""
    frozen_base: bool = False
    """With ``finetune_steps``: the sampler steps before the fine-tuned ones run a frozen copy
    of the initial (pre-trained) denoiser and encoder, as DPPO's reference does; false = they
    run the fine-tuned weights (without grad) and drift with them."""
    grad_checkpointing: bool = False
    """Recompute each denoiser call in the backward pass: less memory, ~1 more forward."""
    compile: Optional[Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]] = None
    """``torch.compile`` the denoising chain (rollouts and the update) with this mode; null = eager.
    The first calls compile (tens of seconds on a CPU): it pays on long runs. Where compiling
    fails, the chain falls back to eager with one warning."""
    # --- denoiser network ------------------------------------------------------------
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    """Denoiser MLP layer sizes (residual: the first is the block width, one block per extra entry)."""
    residual: bool = False
    """Residual MLP blocks (DPPO's ResidualMLP) instead of a plain MLP."""
    activation: Literal["mish", "relu", "silu", "tanh"] = "mish"
    """Activation of the denoiser and the critic."""
    step_embed_dim: int = 16
    """Width of the sinusoidal denoising-step embedding."""
    # --- final step: the policy's Gaussian ------------------------------------------
    std: Literal["learned", "fixed"] = "learned"
    """Final-step std: a learned state-independent log-std, or fixed at ``init_std``."""
    init_std: float = 1.0
    """Initial (learned) or constant (fixed) final-step std, in normalised action units."""
    inference_noise: Literal["sample", "zero"] = "sample"
    """Deterministic (evaluation) action: the final mean with the chain's noise drawn
    ('sample') or all noise set to zero ('zero')."""

    def __post_init__(self) -> None:
        problems = []
        if self.denoising_steps < 1:
            problems.append("denoising_steps must be >= 1")
        if self.ddim_steps is not None and not 1 <= self.ddim_steps <= self.denoising_steps:
            problems.append("ddim_steps must be between 1 and denoising_steps")
        if self.ddim_steps is not None and self.sampler != "ddim":
            problems.append("ddim_steps needs sampler: ddim")
        if self.finetune_steps is not None and self.finetune_steps < 1:
            problems.append("finetune_steps must be >= 1 (or null for all steps)")
        if self.frozen_base and self.finetune_steps is None:
            problems.append("frozen_base needs finetune_steps (the steps before them run the frozen copy)")
        if not 0 < self.beta_min <= self.beta_max < 1:
            problems.append("need 0 < beta_min <= beta_max < 1")
        if self.sigma_min < 0 or not 0 < self.init_std <= 7.0:
            problems.append("sigma_min must be >= 0 and 0 < init_std <= 7 (the log-std is clamped to [-5, 2])")
        if not 0 < self.cosine_beta_clip < 1:
            problems.append("cosine_beta_clip must be in (0, 1)")
        for name in ("ddim_eta", "eval_ddim_eta"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"{name} must be in [0, 1]")
        for name in ("logprob_sigma_min", "eval_sigma_min"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must be >= 0 or null")
        for name in ("x0_clip", "noise_clip"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0 or null")
        if not self.hidden or any(h < 1 for h in self.hidden):
            problems.append("hidden must be a non-empty list of positive layer sizes")
        if problems:
            raise ValueError("diffusion: " + "; ".join(problems))

    @property
    def scoring_sigma_min(self) -> float:
        """The std floor of a denoising step's log-prob (DPPO)."""
        return self.sigma_min if self.logprob_sigma_min is None else self.logprob_sigma_min

    @property
    def sampler_steps(self) -> int:
        """Number of denoiser calls per action (S)."""
        if self.sampler == "ddim" and self.ddim_steps is not None:
            return self.ddim_steps
        return self.denoising_steps

    def to_dict(self) -> dict:
        return asdict(self)
