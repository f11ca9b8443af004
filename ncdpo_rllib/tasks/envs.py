"""The task side: build the env a run trains on, and check it before anything starts.

Every run samples from the env registered as ``ENV_NAME`` (``make_env``): the Gymnasium
env (or a Meta-World task, or a PettingZoo env wrapped for RLlib), plus, when asked, a recorder
of raw transitions (``ncdpo collect``) and the action chunk / observation history wrapper, in
that order (the recorder sees per-step data). ``make_base_env`` is the one place that tells the
env kinds apart; ``check_env`` builds the env once on the driver, so that a bad ``env`` section
fails there, with a one-line fix, not in a Ray worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional, Union

import gymnasium as gym

from ncdpo_rllib.errors import ConfigError, unknown_name

from .config import EnvConfig, MultiAgentConfig

ENV_NAME = "ncdpo_env"
RECORD_DIR = "record_dir"
"""A key of RLlib's ``env_config`` that is not an ``EnvConfig`` field: where ``ncdpo collect``
records raw transitions."""
VIDEO = "video"
"""The other one: ``{"dir": ..., "episodes": N}``, record the first N episodes as MP4 (``tasks.video``)."""


def env_context(env: EnvConfig, record_dir: Optional[str] = None, video: Optional[dict] = None) -> dict:
    """The env section as the plain mapping RLlib hands to ``make_env`` on every EnvRunner."""
    out = dataclasses.asdict(env)
    if record_dir:
        out[RECORD_DIR] = str(record_dir)
    if video:
        out[VIDEO] = dict(video)
    return out


def as_env_config(env_config: Union[EnvConfig, Mapping]) -> tuple[EnvConfig, dict]:
    """(EnvConfig, the extra keys: RECORD_DIR, VIDEO) from an EnvConfig or from ``env_context``'s
    mapping (missing keys take EnvConfig's defaults)."""
    if isinstance(env_config, EnvConfig):
        return env_config, {}
    fields = {f.name for f in dataclasses.fields(EnvConfig)}
    unknown = set(env_config) - fields - {RECORD_DIR, VIDEO}
    if unknown:
        raise ConfigError(f"env: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(fields))}")
    extras = {k: env_config[k] for k in (RECORD_DIR, VIDEO) if env_config.get(k)}
    return EnvConfig(**{k: v for k, v in env_config.items() if k in fields}), extras


def make_base_env(env: EnvConfig, pixels: bool = True, render: bool = False) -> gym.Env:
    """The single-agent env before chunking: a Gymnasium env with its time limit, a Meta-World
    or a robosuite task (rendering its camera image when ``pixels`` and the config asks for pixels). ``render``:
    a Gymnasium env made with ``render_mode="rgb_array"`` (for videos; a one-line error where it
    cannot render)."""
    if env.kind == "metaworld":
        from .metaworld import make_metaworld_env

        return make_metaworld_env(env, pixels=pixels)
    if env.kind == "robosuite":
        from .robosuite_tasks import make_robosuite_env

        return make_robosuite_env(env, pixels=pixels)
    if env.kind != "gymnasium":
        raise ConfigError(f"env.kind {env.kind!r}: a single-agent env (gymnasium, metaworld or robosuite) is needed here")
    try:
        gym.spec(env.id)
    except gym.error.Error:
        raise ConfigError(unknown_name("env.id", env.id, "a registered Gymnasium env", gym.registry.keys())) from None
    limit = {"max_episode_steps": env.max_episode_steps} if env.max_episode_steps else {}
    if render:
        modes = _render_modes(env.id)
        if "rgb_array" not in modes:
            raise ConfigError(f"env {env.id!r} cannot render rgb_array frames (render modes: "
                              f"{', '.join(modes) or 'none'}), so it cannot be recorded; drop --video")
        limit["render_mode"] = "rgb_array"
    try:
        return gym.make(env.id, **limit, **env.kwargs)
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError(f"env.id {env.id!r} needs an extra dependency: {e}") from None
    except TypeError as e:
        raise ConfigError(f"env.kwargs for {env.id!r} are not accepted: {e}") from None


def check_scripted(env: EnvConfig) -> None:
    """Only Meta-World and robosuite tasks have scripted experts."""
    if env.kind not in ("metaworld", "robosuite"):
        raise ConfigError(f"collect.scripted records the scripted experts of Meta-World and robosuite tasks; env.kind "
                          f"is {env.kind!r} (train a PPO expert instead: collect.scripted: false)")


def scripted_expert(env: EnvConfig):
    """(env, act, source) for ``collect.scripted``: the task made as for pixels (observations
    [state, image] when the config asks for images), a function from its observation to the
    scripted expert's action, and a line naming the expert. Meta-World's experts read the state
    part of the observation; robosuite's read the simulator's positions."""
    check_scripted(env)
    if env.kind == "metaworld":
        from .metaworld import make_metaworld_env, scripted_policy

        base = make_metaworld_env(env)
        state_dim = getattr(base, "state_dim", base.observation_space.shape[0])
        expert = scripted_policy(env.id)
        return base, lambda obs: expert.get_action(obs[:state_dim]), f"Meta-World scripted expert ({env.id}, goal {env.goal})"
    from .robosuite_tasks import make_robosuite_env, scripted_policy

    base = make_robosuite_env(env)
    expert = scripted_policy(base)
    return base, expert.get_action, f"robosuite scripted expert ({env.id}, {env.robots}, {type(expert).__name__})"


def _render_modes(env_id: str) -> list[str]:
    """The render modes an env class declares (``metadata["render_modes"]``), without making it."""
    entry = gym.spec(env_id).entry_point
    if callable(entry):
        cls = entry
    else:
        import importlib

        module, _, name = str(entry).partition(":")
        cls = getattr(importlib.import_module(module), name)
    return list(getattr(cls, "metadata", {}).get("render_modes", []))


def make_env(env_config: Union[EnvConfig, Mapping]):
    """The env factory RLlib calls on every EnvRunner (registered as ``ncdpo_env``), with
    ``env_context``'s mapping; an ``EnvConfig`` works as well.

    Pixels are rendered above the chunking when the policy sees one observation (To = 1):
    one frame per policy step instead of one per env step (Ta times fewer renders)."""
    cfg, extras = as_env_config(env_config)
    if cfg.kind == "pettingzoo":
        from .multiagent import make_multi_agent_env

        return make_multi_agent_env(cfg, video=extras.get(VIDEO))
    pixels_on_top = cfg.pixels and cfg.obs_history == 1
    video = extras.get(VIDEO)
    env = make_base_env(cfg, pixels=not pixels_on_top, render=bool(video) and cfg.kind == "gymnasium")
    if video:
        from .video import EpisodeVideo, video_fps, video_frames

        env = EpisodeVideo(env, video["dir"], int(video["episodes"]), video_frames(env, cfg.kind, cfg.camera),
                           video_fps(env), prefix=video.get("prefix", "episode"))
    if RECORD_DIR in extras:
        from ncdpo_rllib.data import RecordingWrapper

        env = RecordingWrapper(env, extras[RECORD_DIR])
    if cfg.action_chunk > 1 or cfg.obs_history > 1:
        from .wrappers import ActionChunkObsHistory

        env = ActionChunkObsHistory(env, cfg.action_chunk, cfg.obs_history)
    if pixels_on_top:
        from .pixels import PixelObservations

        env = PixelObservations(env, cfg.image_size, cfg.cameras)
    return env


def register() -> str:
    """Register ``make_env`` with Ray Tune's registry (RLlib looks string envs up there)."""
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_env)
    return ENV_NAME


def check_env(env: EnvConfig, multi_agent: Optional[MultiAgentConfig] = None, *, for_diffusion: bool):
    """Build the env once on the driver (then close it) and return its base spaces, so that a bad
    ``env`` section is a one-line ConfigError here, not a crash in a Ray worker. Single-agent:
    (observation_space, action_space) before chunking; PettingZoo: ``AgentSpaces`` (and the
    ``multi_agent`` section's policy mapping is checked against the agents)."""
    if env.kind == "pettingzoo":
        from .multiagent import check_pettingzoo_env, policy_mapping

        spaces = check_pettingzoo_env(env.id, env.kwargs, diffusion=for_diffusion)
        ma = multi_agent or MultiAgentConfig()
        policy_mapping(ma.policies, ma.groups, spaces)
        return spaces
    base = make_base_env(env)
    try:
        if env.pixels:
            base.reset(seed=0)  # renders a frame: fails here, with the MUJOCO_GL fix, not in a worker
        obs_space, act_space = base.observation_space, base.action_space
    finally:
        base.close()
    box = isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1
    if for_diffusion and not (box or isinstance(act_space, gym.spaces.Discrete)):
        raise ConfigError(
            f"env {env.id!r} has action space {act_space}; the diffusion policy needs a 1-D Box "
            "(continuous) or a Discrete action space - use algorithm: ppo for other spaces"
        )
    if for_diffusion and not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError(
            f"env {env.id!r} has observation space {obs_space}; the diffusion policy's encoder takes "
            "a Box observation (wrap the env with gymnasium.wrappers.FlattenObservation)"
        )
    chunked = env.action_chunk > 1 or env.obs_history > 1
    if chunked and not (isinstance(obs_space, gym.spaces.Box) and isinstance(act_space, gym.spaces.Box)):
        raise ConfigError(
            f"env.action_chunk / env.obs_history need Box observation and action spaces; {env.id} has "
            f"{obs_space} and {act_space}"
        )
    return obs_space, act_space
