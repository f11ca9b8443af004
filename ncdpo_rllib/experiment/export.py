"""``ncdpo export``: a checkpoint's deterministic policy as one self-contained file (TorchScript or
ONNX), run outside the training stack with ``ncdpo_rllib.load_policy`` (torch or onnxruntime only).

What the file computes is what the evaluation EnvRunner does with ``explore=False``, piece by
piece (``ExportedPolicy``): RLlib's MeanStdFilter with the run's statistics (when the run had one),
the module's own normaliser (a pre-trained policy's), the actor (image encoder, every denoising
step; the final mean, or the argmax of the logits for a Discrete space), then RLlib's
NormalizeAndClipActions (unsquash to the env's bounds and clip) and the action chunk as (Ta, d).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from ncdpo_rllib.errors import ConfigError
from ncdpo_rllib.policy_file import METADATA_KEY

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


class ExportedPolicy(nn.Module):
    """(observation batch, noise batch) -> env actions; see the module docstring."""

    def __init__(self, module, *, obs_filter: Optional[dict], action_space, normalize_actions: bool,
                 clip_actions: bool, chunk: int):
        super().__init__()
        self.actor = copy.deepcopy(module.actor).eval().requires_grad_(False)
        self.discrete = bool(module.discrete)
        self.actor_obs_dim = int(module.actor_obs_dim)
        self.register_buffer("obs_shift", module.obs_shift.detach().clone())
        self.register_buffer("obs_scale", module.obs_scale.detach().clone())
        self.filtered = obs_filter is not None
        f = obs_filter or {"mean": np.zeros(1), "std": np.ones(1), "demean": False, "destd": False, "clip": 0.0}
        self.register_buffer("filter_mean", torch.as_tensor(np.asarray(f["mean"], np.float32).reshape(-1)))
        self.register_buffer("filter_std", torch.as_tensor(np.asarray(f["std"], np.float32).reshape(-1)))
        self.demean, self.destd, self.clip = bool(f["demean"]), bool(f["destd"]), float(f["clip"] or 0.0)
        self.chunk = chunk
        low = np.asarray(getattr(action_space, "low", np.zeros(1)), np.float32)
        high = np.asarray(getattr(action_space, "high", np.zeros(1)), np.float32)
        bounded = not self.discrete and bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)))
        self.unsquash = bounded and normalize_actions
        self.clip_to_bounds = bounded and (normalize_actions or clip_actions)
        self.register_buffer("low", torch.as_tensor(low.reshape(-1)))
        self.register_buffer("high", torch.as_tensor(high.reshape(-1)))

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(obs.shape[0], -1).float()
        if self.filtered:
            if self.demean:
                x = x - self.filter_mean
            if self.destd:
                x = x / (self.filter_std + 1e-6)  # RLlib's SMALL_NUMBER
            if self.clip:
                x = x.clamp(-self.clip, self.clip)
        x = ((x - self.obs_shift) / self.obs_scale)[:, : self.actor_obs_dim]
        if self.discrete:
            return self.actor(x, noise, evaluation=True).argmax(-1)
        action = self.actor(x, noise, evaluation=True)[0]
        if self.unsquash:
            action = self.low + (action + 1.0) * (self.high - self.low) / 2.0
        if self.clip_to_bounds:
            action = torch.maximum(torch.minimum(action, self.high), self.low)
        return action.reshape(action.shape[0], self.chunk, -1) if self.chunk > 1 else action


def _filter_state(runner) -> Optional[dict]:
    """The MeanStdFilter's statistics in the runner's env-to-module connector (None without one)."""
    from ray.rllib.utils.filter import RunningStat

    state = runner.get_state(components="env_to_module_connector").get("env_to_module_connector", {})
    filters = [v for k, v in state.items() if "MeanStdFilter" in k]
    if not filters:
        return None
    agents = filters[0]
    if len(agents) != 1:
        raise ConfigError("export: one observation filter per agent; multi-agent export is not supported yet")
    s = next(iter(agents.values()))
    stats = [RunningStat.from_state(r) for r in s["running_stats"]]
    if len(stats) != 1:
        raise ConfigError("export: a dict/tuple observation space is not supported")
    return {"mean": stats[0].mean, "std": stats[0].std, "demean": s["de_mean_to_zero"],
            "destd": s["de_std_to_one"], "clip": s["clip_by_value"]}


def policy_runner(checkpoint: str):
    """(EnvRunner with the checkpoint's module and connector state, experiment config, source):
    a training checkpoint (or run dir) or a pre-trained policy (``ncdpo pretrain``'s output)."""
    from .checkpoints import load_checkpoint_meta
    from .evaluate import load_env_runner, pretrained_env_runner
    from .pretrained import is_pretrained, load_module_state, load_pretrained_meta

    if is_pretrained(checkpoint):
        ckpt, exp, _ = load_pretrained_meta(checkpoint)
        exp = _eager(exp)
        return pretrained_env_runner(exp, load_module_state(ckpt)), exp, ckpt
    ckpt, exp, _ = load_checkpoint_meta(checkpoint)
    exp = _eager(exp)
    return load_env_runner(ckpt, exp, seed=0), exp, ckpt


def _eager(exp):
    """Tracing runs the chain eagerly (``diffusion.compile`` off)."""
    return dataclasses.replace(exp, diffusion=dataclasses.replace(exp.diffusion, compile=None))


def build_exported(runner, exp) -> tuple[ExportedPolicy, dict]:
    """The ExportedPolicy of a single-agent runner, and its metadata."""
    from ncdpo_rllib.rl import DiffusionPolicyModule

    module = runner.module
    if exp.env.kind == "pettingzoo":
        raise ConfigError("export: multi-agent checkpoints are not supported yet; export a single-agent run")
    if not isinstance(module, DiffusionPolicyModule):
        raise ConfigError(f"export: the checkpoint's policy is {type(module).__name__} (algorithm: {exp.algorithm}); "
                          "only diffusion policies (ncdpo, dppo, pretrain) export")
    config = runner.config
    space = runner.env.single_action_space
    policy = ExportedPolicy(module, obs_filter=_filter_state(runner), action_space=space,
                            normalize_actions=bool(config.normalize_actions), clip_actions=bool(config.clip_actions),
                            chunk=exp.env.action_chunk)
    obs_space = runner.env.single_observation_space
    metadata = {
        "format_version": 1, "env": exp.env.id, "env_kind": exp.env.kind, "algorithm": exp.algorithm,
        "obs_shape": list(obs_space.shape), "noise_shape": list(module.actor.noise_shape),
        "discrete": policy.discrete, "action_chunk": exp.env.action_chunk, "obs_history": exp.env.obs_history,
        "observation": exp.env.observation, "inference_noise": exp.diffusion.inference_noise,
        "denoising_steps": exp.diffusion.denoising_steps,
    }
    return policy, metadata


def export(checkpoint: str, fmt: Literal["torchscript", "onnx"], out: str) -> dict:
    """Write the policy file (atomically: a failed export leaves no file) and return a summary."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    out_path = Path(out)
    if out_path.suffix != SUFFIX[fmt]:
        raise ConfigError(f"--out {out}: {'an' if fmt == 'onnx' else 'a'} {fmt} file ends in {SUFFIX[fmt]}")
    if not out_path.parent.is_dir():
        raise ConfigError(f"--out {out}: the directory {out_path.parent} does not exist")
    runner, exp, ckpt = policy_runner(checkpoint)
    try:
        policy, metadata = build_exported(runner, exp)
        metadata["source"] = str(ckpt)
        obs = torch.as_tensor(np.stack([runner.env.single_observation_space.sample() for _ in range(2)]),
                              dtype=torch.float32)
        noise = torch.randn(2, *metadata["noise_shape"])
    finally:
        runner.stop()
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with torch.no_grad():
            (write_torchscript if fmt == "torchscript" else write_onnx)(policy, obs, noise, metadata, tmp)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": str(out_path), "format": fmt, "bytes": out_path.stat().st_size, **metadata}


def write_torchscript(policy: ExportedPolicy, obs, noise, metadata: dict, path: Path) -> None:
    traced = torch.jit.trace(policy, (obs, noise), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: json.dumps(metadata)})


def write_onnx(policy: ExportedPolicy, obs, noise, metadata: dict, path: Path) -> None:
    import logging

    import onnx

    # "torchvision is not installed. Skipping torchvision::nms" and the like: not ours to act on.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(policy, (obs, noise), dynamo=True, input_names=["obs", "noise"],
                                output_names=["action"], dynamic_shapes=({0: batch}, {0: batch}), verbose=False)
    program.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    onnx.save(model, str(path))
