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
        # The actor reads the first actor_obs_dim entries (its own observation, before a centralised
        # critic's global state): the file takes just those, and every per-entry statistic is cut to them.
        d = self.actor_obs_dim = int(module.actor_obs_dim)
        self.register_buffer("obs_shift", module.obs_shift.detach().clone()[:d])
        self.register_buffer("obs_scale", module.obs_scale.detach().clone()[:d])
        self.filtered = obs_filter is not None
        f = obs_filter or {"mean": np.zeros(1), "std": np.ones(1), "demean": False, "destd": False, "clip": 0.0}
        self.register_buffer("filter_mean", torch.as_tensor(np.asarray(f["mean"], np.float32).reshape(-1)[:d]))
        self.register_buffer("filter_std", torch.as_tensor(np.asarray(f["std"], np.float32).reshape(-1)[:d]))
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
        x = obs.reshape(obs.shape[0], -1).float()[:, : self.actor_obs_dim]
        if self.filtered:
            if self.demean:
                x = x - self.filter_mean
            if self.destd:
                x = x / (self.filter_std + 1e-6)  # RLlib's SMALL_NUMBER
            if self.clip:
                x = x.clamp(-self.clip, self.clip)
        x = (x - self.obs_shift) / self.obs_scale
        if self.discrete:
            return self.actor(x, noise, evaluation=True).argmax(-1)
        action = self.actor(x, noise, evaluation=True)[0]
        if self.unsquash:
            action = self.low + (action + 1.0) * (self.high - self.low) / 2.0
        if self.clip_to_bounds:
            action = torch.maximum(torch.minimum(action, self.high), self.low)
        return action.reshape(action.shape[0], self.chunk, -1) if self.chunk > 1 else action


def _filter_states(runner) -> dict:
    """The MeanStdFilter's statistics in the runner's env-to-module connector, per agent (None: the
    single agent); empty without a filter."""
    from ray.rllib.utils.filter import RunningStat

    state = runner.get_state(components="env_to_module_connector").get("env_to_module_connector", {})
    filters = [v for k, v in state.items() if "MeanStdFilter" in k]
    out = {}
    for agent, s in (filters[0] if filters else {}).items():
        stats = [RunningStat.from_state(r) for r in s["running_stats"]]
        if len(stats) != 1:
            raise ConfigError("export: a dict/tuple observation space is not supported")
        out[agent] = {"mean": stats[0].mean, "std": stats[0].std, "demean": s["de_mean_to_zero"],
                      "destd": s["de_std_to_one"], "clip": s["clip_by_value"]}
    return out


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


def build_exported(runner, exp) -> list[tuple]:
    """(agent, ExportedPolicy, metadata) per file: one for a single-agent run (agent None), one per
    agent for a PettingZoo run (its policy's weights with that agent's observation filter)."""
    from ncdpo_rllib.rl import DiffusionPolicyModule

    config, filters = runner.config, _filter_states(runner)
    base = {"format_version": 1, "env": exp.env.id, "env_kind": exp.env.kind, "algorithm": exp.algorithm,
            "action_chunk": exp.env.action_chunk, "obs_history": exp.env.obs_history, "observation": exp.env.observation,
            "inference_noise": exp.diffusion.inference_noise, "denoising_steps": exp.diffusion.denoising_steps}
    if exp.env.kind == "pettingzoo":
        from ncdpo_rllib.tasks.multiagent import check_pettingzoo_env, policy_mapping

        spaces = check_pettingzoo_env(exp.env.id, exp.env.kwargs, diffusion=exp.diffusion_policy)
        mapping = policy_mapping(exp.multi_agent.policies, exp.multi_agent.groups, spaces)
        parts = [(agent, runner.module[pid], spaces.observation[agent], spaces.action[agent], {"policy": pid})
                 for agent, pid in mapping.items()]
    else:
        parts = [(None, runner.module, runner.env.single_observation_space, runner.env.single_action_space, {})]
    out = []
    for agent, module, obs_space, act_space, extra in parts:
        if not isinstance(module, DiffusionPolicyModule):
            raise ConfigError(f"export: the checkpoint's policy is {type(module).__name__} (algorithm: "
                              f"{exp.algorithm}); only diffusion policies (ncdpo, dppo, pretrain) export")
        policy = ExportedPolicy(module, obs_filter=filters.get(agent), action_space=act_space,
                                normalize_actions=bool(config.normalize_actions), clip_actions=bool(config.clip_actions),
                                chunk=exp.env.action_chunk)
        meta = {**base, **extra, **({"agent": agent} if agent is not None else {}), "obs_shape": list(obs_space.shape),
                "noise_shape": list(module.actor.noise_shape), "discrete": policy.discrete}
        out.append((agent, policy, meta, obs_space))
    return out


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
        parts = build_exported(runner, exp)
    finally:
        runner.stop()
    write = write_torchscript if fmt == "torchscript" else write_onnx
    written, tmps = [], []
    try:
        for agent, policy, metadata, obs_space in parts:
            path = out_path if agent is None else out_path.with_name(f"{out_path.stem}-{agent}{out_path.suffix}")
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmps.append(tmp)
            obs = torch.as_tensor(np.stack([obs_space.sample() for _ in range(2)]), dtype=torch.float32)
            with torch.no_grad():
                write(policy, obs, torch.randn(2, *metadata["noise_shape"]), {**metadata, "source": str(ckpt)}, tmp)
            written.append((tmp, path, metadata))
        for tmp, path, _ in written:  # all files or none
            tmp.replace(path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    files = [str(path) for _, path, _ in written]
    summary = {"file": files[0], "files": files, "format": fmt, "bytes": sum(Path(f).stat().st_size for f in files),
               **{k: v for k, v in written[0][2].items() if k not in ("agent", "policy")}}
    if exp.env.kind == "pettingzoo":
        summary["agents"] = {m["agent"]: {"file": str(p), "policy": m["policy"]} for _, p, m in written}
    return summary


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
