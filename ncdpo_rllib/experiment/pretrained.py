"""Pre-trained checkpoints (``ncdpo pretrain`` output) and how fine-tuning starts from one.

Layout::

    <run dir>/pretrained/
        experiment.yaml    the resolved config of the pre-training run
        pretrain.json      dataset, losses, evaluation of the pre-trained policy
        module/            RLlib RLModule checkpoint (``save_to_path``): EMA weights of the
                           denoiser, observation normaliser (obs_shift/obs_scale buffers)

Written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .config import ExperimentConfig, parse_config
from .loader import flatten
from ncdpo_rllib.errors import CheckpointError, ConfigError, one_line

PRETRAINED = "pretrained"
META = "pretrain.json"
CONFIG = "experiment.yaml"
MODULE = "module"

ARCH_KEYS = (
    "env.id", "env.action_chunk", "env.obs_history", "env.observation", "env.image_size", "env.camera",
    "encoder.type", "encoder.feature_dim",
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
    try:
        meta = json.loads((ckpt / META).read_text())
        exp = parse_config(yaml.safe_load((ckpt / CONFIG).read_text()))
    except FileNotFoundError as e:
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} is incomplete: {Path(e.filename).name} missing") from None
    except (json.JSONDecodeError, yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} is corrupt: {one_line(e)}") from None
    if not (ckpt / MODULE).is_dir():
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} is incomplete: {MODULE}/ missing")
    return ckpt, exp, meta


def load_module_state(ckpt: Path) -> dict[str, Any]:
    """The pre-trained module's state dict (numpy arrays), read in this process."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    try:
        module = RLModule.from_checkpoint(str((ckpt / MODULE).resolve()))
        return module.get_state()
    except Exception as e:  # RLlib raises assorted errors on damaged files
        msg = one_line(e, with_type=True)
        raise CheckpointError(f"pre-trained checkpoint {str(ckpt)!r} could not be loaded: {msg}") from None


def check_compatible(pre: ExperimentConfig, exp: ExperimentConfig, where: str) -> None:
    old, new = flatten(pre.to_dict()), flatten(exp.to_dict())
    changed = [k for k in ARCH_KEYS if old.get(k) != new.get(k)]
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in changed)
        raise ConfigError(f"init_from {where}: the pre-trained policy differs in {diffs}; make them equal")
