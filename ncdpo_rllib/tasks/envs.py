"""The task side: build the env a run trains on, and check it before anything starts.

Every run samples from the env registered as ``ENV_NAME`` (``make_env``): the Gymnasium
env (or a Meta-World task, or a PettingZoo env wrapped for RLlib), plus, when asked, a recorder of raw transitions (``ncdpo collect``) and the action
chunk / observation history wrapper, in that order (the recorder sees per-step data).
"""

from __future__ import annotations

import difflib

import gymnasium as gym

from ncdpo_rllib.experiment.errors import ConfigError

ENV_NAME = "ncdpo_env"


def make_env(env_config: dict):
    """env_config: kind, id, kwargs, goal, max_episode_steps, observation, image_size, camera,
    action_chunk, obs_history, record_dir (optional).

    Pixels are rendered above the chunking when the policy sees one observation (To = 1):
    one frame per policy step instead of one per env step (Ta times fewer renders)."""
    kind = env_config.get("kind", "gymnasium")
    chunk, history = env_config.get("action_chunk", 1), env_config.get("obs_history", 1)
    pixels_on_top = env_config.get("observation", "state") != "state" and history == 1
    if kind == "pettingzoo":
        from .multiagent import make_multi_agent_env

        return make_multi_agent_env(env_config)
    if kind == "metaworld":
        from .metaworld import make_metaworld_env

        env = make_metaworld_env(env_config, pixels=not pixels_on_top)
    else:
        limit = {"max_episode_steps": env_config["max_episode_steps"]} if env_config.get("max_episode_steps") else {}
        env = gym.make(env_config["id"], **limit, **env_config.get("kwargs", {}))
    if env_config.get("record_dir"):
        from ncdpo_rllib.data import RecordingWrapper

        env = RecordingWrapper(env, env_config["record_dir"])
    if chunk > 1 or history > 1:
        from .wrappers import ActionChunkObsHistory

        env = ActionChunkObsHistory(env, chunk, history)
    if pixels_on_top:
        from .pixels import PixelObservations

        env = PixelObservations(env, env_config.get("image_size", 64), env_config.get("camera", "corner2"))
    return env


def register() -> str:
    """Register ``make_env`` with Ray Tune's registry (RLlib looks string envs up there)."""
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_env)
    return ENV_NAME


def check_gymnasium_env(env_id: str, kwargs: dict, *, for_diffusion: bool) -> tuple[gym.Space, gym.Space]:
    """Build the env once (then close it) and return (observation_space, action_space).

    Raises ConfigError with a one-line fix for unknown ids, missing extras, bad kwargs
    and action spaces the diffusion policy does not support.
    """
    try:
        gym.spec(env_id)
    except gym.error.Error:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"env.id {env_id!r} is not a registered Gymnasium env{hint}") from None
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError(f"env.id {env_id!r} needs an extra dependency: {e}") from None
    except TypeError as e:
        raise ConfigError(f"env.kwargs for {env_id!r} are not accepted: {e}") from None
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    box = isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1
    if for_diffusion and not (box or isinstance(act_space, gym.spaces.Discrete)):
        raise ConfigError(
            f"env {env_id!r} has action space {act_space}; the diffusion policy needs a 1-D Box "
            "(continuous) or a Discrete action space - use algorithm: ppo for other spaces"
        )
    if for_diffusion and not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError(
            f"env {env_id!r} has observation space {obs_space}; the diffusion policy's encoder takes "
            "a Box observation (wrap the env with gymnasium.wrappers.FlattenObservation)"
        )
    return obs_space, act_space
