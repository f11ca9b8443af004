"""RLlib glue: the diffusion RLModule, the NCDPO learner and config."""

from .config import NCDPO, NCDPOConfig, mean_std_filter_connector
from .learner import NCDPOTorchLearner, NonFiniteParametersError
from .module import NOISE, DiffusionPolicyModule

__all__ = [
    "NCDPO",
    "NCDPOConfig",
    "NCDPOTorchLearner",
    "NOISE",
    "DiffusionPolicyModule",
    "NonFiniteParametersError",
    "mean_std_filter_connector",
]
