"""RLlib glue: the diffusion RLModule, the NCDPO learner and config, and the DPPO baseline.

The names below load on first use (PEP 562), so that ``ncdpo_rllib.rl.defaults`` can be read
without importing RLlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NCDPO": "config", "NCDPOConfig": "config", "mean_std_filter_connector": "config",
    "NCDPOAPPO": "appo", "NCDPOAPPOConfig": "appo", "NCDPOAPPOTorchLearner": "appo", "DiffusionAPPOModule": "appo",
    "DPPO": "dppo", "DPPO_CHAIN": "dppo", "DPPO_STEP_LOGP": "dppo", "DPPOConfig": "dppo", "DPPOModule": "dppo",
    "DPPOTorchLearner": "dppo",
    "NCDPOTorchLearner": "learner", "NonFiniteParametersError": "learner",
    "NOISE": "module", "DiffusionPolicyModule": "module",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
