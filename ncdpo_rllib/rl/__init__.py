"""RLlib glue: the diffusion RLModule, the NCDPO learner and config, and the DPPO baseline."""

from .config import NCDPO, NCDPOConfig, mean_std_filter_connector
from .dppo import DPPO, DPPO_CHAIN, DPPO_STEP_LOGP, DPPOConfig, DPPOModule, DPPOTorchLearner
from .learner import NCDPOTorchLearner, NonFiniteParametersError
from .module import NOISE, DiffusionPolicyModule

__all__ = [
    "DPPO",
    "DPPOConfig",
    "DPPOModule",
    "DPPOTorchLearner",
    "DPPO_CHAIN",
    "DPPO_STEP_LOGP",
    "NCDPO",
    "NCDPOConfig",
    "NCDPOTorchLearner",
    "NOISE",
    "DiffusionPolicyModule",
    "NonFiniteParametersError",
    "mean_std_filter_connector",
]
