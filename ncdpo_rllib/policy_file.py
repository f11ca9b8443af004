"""Run an exported policy (``ncdpo export``) with torch alone, or with onnxruntime: no Ray, no RLlib.

    import gymnasium as gym
    from ncdpo_rllib import load_policy

    policy = load_policy("hopper.pt")            # or "hopper.onnx" (onnxruntime)
    env = gym.make(policy.metadata["env"])
    obs, _ = env.reset(seed=0)
    action = policy(obs, seed=0)                 # the env action ((Ta, act_dim) for a chunk)

The file holds the whole deterministic policy: the observation filter of the run (RLlib's
MeanStdFilter, if it had one), the policy's own normaliser, the image encoder, every denoising
step and the mapping to the env's action bounds. Its inputs are the observation, as the env (with
the run's ``obs_history`` stacking) gives it, and the chain's noise (drawn here from ``seed``, or
passed as ``noise``); its output is what ``env.step`` takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

METADATA_KEY = "ncdpo.json"
"""Where the export's metadata lives: a TorchScript extra file, an ONNX metadata property."""


class PolicyFileError(ValueError):
    """A file that is not a policy exported by ``ncdpo export``."""


class ExportedPolicyRunner:
    """``policy(obs, seed=None, noise=None) -> action``; ``metadata`` describes the file."""

    def __init__(self, path: Path, metadata: dict, run):
        self.path, self.metadata, self._run = path, metadata, run
        self.obs_shape = tuple(metadata["obs_shape"])
        self.noise_shape = tuple(metadata["noise_shape"])

    def noise(self, batch: int, seed: Optional[int] = None) -> np.ndarray:
        """The chain's noise for ``batch`` observations: standard normal (zeros where the run
        evaluated with ``diffusion.inference_noise: zero``)."""
        if self.metadata.get("inference_noise") == "zero":
            return np.zeros((batch, *self.noise_shape), np.float32)
        return np.random.default_rng(seed).standard_normal((batch, *self.noise_shape), dtype=np.float32)

    def __call__(self, obs, seed: Optional[int] = None, noise=None) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        single = obs.shape == self.obs_shape
        if single:
            obs = obs[None]
        if obs.shape[1:] != self.obs_shape:
            raise ValueError(f"observation shape {obs.shape} does not fit the policy's {self.obs_shape} "
                             "(one observation, or a batch of them)")
        noise = self.noise(obs.shape[0], seed) if noise is None else np.asarray(noise, dtype=np.float32)
        if single and noise.shape == self.noise_shape:
            noise = noise[None]
        if noise.shape != (obs.shape[0], *self.noise_shape):
            raise ValueError(f"noise shape {noise.shape} does not fit ({obs.shape[0]}, {self.noise_shape})")
        action = self._run(obs, noise)
        return action[0] if single else action


def load_policy(path) -> ExportedPolicyRunner:
    """An exported policy: ``.pt`` (TorchScript, run with torch) or ``.onnx`` (run with onnxruntime)."""
    path = Path(path)
    if not path.is_file():
        raise PolicyFileError(f"{path}: no such file")
    if path.suffix == ".onnx":
        return _load_onnx(path)
    return _load_torchscript(path)


def _metadata(path: Path, text) -> dict:
    if not text:
        raise PolicyFileError(f"{path}: no {METADATA_KEY} inside; not a file written by `ncdpo export`")
    return json.loads(text)


def _load_torchscript(path: Path) -> ExportedPolicyRunner:
    import torch

    extra = {METADATA_KEY: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as e:
        raise PolicyFileError(f"{path}: not a TorchScript file ({str(e).splitlines()[0]})") from None
    module.eval()

    def run(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(obs), torch.from_numpy(noise)).numpy()

    return ExportedPolicyRunner(path, _metadata(path, extra[METADATA_KEY]), run)


def _load_onnx(path: Path) -> ExportedPolicyRunner:
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: not "can't constant fold Mish node"
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (onnxruntime raises its own assorted types)
        raise PolicyFileError(f"{path}: not a valid ONNX file ({str(e).splitlines()[0]})") from None
    metadata = _metadata(path, session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))
    names = [i.name for i in session.get_inputs()]

    def run(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return session.run(None, dict(zip(names, (obs, noise))))[0]

    return ExportedPolicyRunner(path, metadata, run)
