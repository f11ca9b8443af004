"""Pre-trained checkpoints (``ncdpo pretrain`` output) and how fine-tuning starts from one.

Layout::

    <run dir>/pretrained/
        experiment.yaml    the resolved config of the pre-training run
        pretrain.json      dataset, losses, evaluation of the pre-trained policy
        weights.pt         the module's state dict (EMA weights of the denoiser, observation
                           normaliser buffers obs_shift/obs_scale) as plain tensors: what ncdpo
                           loads, with ``torch.load(weights_only=True)`` (no pickled code runs)
        module/            the same module as an RLlib RLModule checkpoint (``save_to_path``), for
                           ``RLModule.from_checkpoint``; it is a pickle, read only by checkpoints
                           written before weights.pt existed
        ncdpo_manifest.json  the SHA-256 of every other file, written last

Written under a temporary name and renamed when complete; reading checks the manifest first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .config import ExperimentConfig, parse_config
from .loader import changed_keys, flatten
from ncdpo_rllib.errors import CheckpointError, ConfigError, one_line
from ncdpo_rllib.integrity import manifest_problem

PRETRAINED = "pretrained"
META = "pretrain.json"
CONFIG = "experiment.yaml"
MODULE = "module"
WEIGHTS = "weights.pt"

ARCH_KEYS = (
    "env.id", "env.action_chunk", "env.obs_history", "env.observation", "env.image_size", "env.camera",
    "env.extra_cameras", "env.robots", "env.obs_keys", "encoder.type", "encoder.feature_dim",
    "diffusion.denoising_steps", "diffusion.prediction", "diffusion.schedule", "diffusion.beta_min",
    "diffusion.beta_max", "diffusion.cosine_beta_clip", "diffusion.hidden", "diffusion.residual",
    "diffusion.activation", "diffusion.step_embed_dim",
)
"""Keys a fine-tuning config must share with the pre-training one (they fix the weights'
shapes and meaning); sampler knobs (DDIM, clips, sigma_min, finetune_steps, frozen_base) and the
final std (``std``, ``init_std``: behaviour cloning never trains it, fine-tuning starts its own)
may differ."""


def resolve_pretrained(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"pre-trained checkpoint {str(p)!r} not found (init_from / evaluate)")
    for candidate in (p, p / PRETRAINED):
        if (candidate / META).is_file():
            return candidate
    raise CheckpointError(
        f"{str(p)!r} is not a pre-trained checkpoint (no {META}); pass the directory `ncdpo pretrain` "
        f"printed (<run dir>/{PRETRAINED})"
    )


def is_pretrained(path: str | Path) -> bool:
    p = Path(path)
    return (p / META).is_file() or (p / PRETRAINED / META).is_file()


def load_pretrained_meta(path: str | Path) -> tuple[Path, ExperimentConfig, dict]:
    ckpt = resolve_pretrained(path)
    problem = manifest_problem(ckpt)
    if problem:
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} is {problem}; pre-train it again or "
                              "use another copy")
    try:
        meta = json.loads((ckpt / META).read_text())
        exp = parse_config(yaml.safe_load((ckpt / CONFIG).read_text()))
    except FileNotFoundError as e:
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} is incomplete: {Path(e.filename).name} missing") from None
    except (json.JSONDecodeError, yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} is corrupt: {one_line(e)}") from None
    if not (ckpt / WEIGHTS).is_file() and not (ckpt / MODULE).is_dir():
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} is incomplete: {WEIGHTS} missing")
    return ckpt, exp, meta


def save_weights(state: dict[str, Any], path: Path) -> None:
    """A module state dict (numpy arrays or tensors) as plain tensors, loadable with weights_only=True."""
    import torch

    torch.save({k: torch.as_tensor(v).detach().cpu().clone() for k, v in state.items()}, path)


def load_module_state(ckpt: Path) -> dict[str, Any]:
    """The pre-trained module's state dict (numpy arrays), read in this process: from weights.pt with
    ``torch.load(weights_only=True)``, which runs no pickled code; a checkpoint from before weights.pt
    falls back to RLlib's RLModule checkpoint (a pickle: trusted input only)."""
    if (ckpt / WEIGHTS).is_file():
        import torch

        try:
            state = torch.load(ckpt / WEIGHTS, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError("not a dict of tensors")
            return {k: v.numpy() for k, v in state.items()}
        except Exception as e:  # torch raises assorted errors on damaged or foreign files
            msg = one_line(e, with_type=True)
            raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r}: {WEIGHTS} could not be loaded: {msg}") from None
    from ray.rllib.core.rl_module.rl_module import RLModule

    try:
        module = RLModule.from_checkpoint(str((ckpt / MODULE).resolve()))
        return module.get_state()
    except Exception as e:  # RLlib raises assorted errors on damaged files
        msg = one_line(e, with_type=True)
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} could not be loaded: {msg}") from None


def check_compatible(pre: ExperimentConfig, exp: ExperimentConfig, where: str) -> None:
    changed = changed_keys(pre.to_dict(), exp.to_dict(), ARCH_KEYS)
    if changed:
        old, new = flatten(pre.to_dict()), flatten(exp.to_dict())
        diffs = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in changed)
        raise ConfigError(f"init_from {where}: the pre-trained policy differs in {diffs}; make them equal")
