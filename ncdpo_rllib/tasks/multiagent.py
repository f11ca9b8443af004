"""PettingZoo envs for RLlib: load by module path, check the spaces, map agents to policies.

``env: {kind: pettingzoo, id: mpe2.simple_spread_v3, kwargs: {...}}`` imports the module,
builds its parallel env (``parallel_env(**kwargs)``; an AEC-only module's ``env()`` goes
through PettingZoo's ``aec_to_parallel``) and wraps it in RLlib's ``ParallelPettingZooEnv``.
Agents that leave the episode early (PettingZoo drops them from the step dicts) are handled
by RLlib's ``MultiAgentEpisode``; the centralised critic fills their slot with zeros.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym

from ncdpo_rllib.errors import ConfigError

from .config import EnvConfig

SHARED_POLICY = "shared"


def _import_env_module(module_path: str):
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        top = module_path.split(".")[0]
        hint = (" (MPE lives in the `mpe2` package now: mpe2.simple_spread_v3)" if module_path.startswith("pettingzoo.mpe")
                else f" (pip install {e.name})" if e.name == top else "")
        raise ConfigError(f"env.id {module_path!r}: cannot import module {e.name!r}{hint}") from None
    except ImportError as e:  # e.g. an extra the env needs (pygame, Box2D, pymunk)
        raise ConfigError(f"env.id {module_path!r} needs an extra dependency: {e}") from None


def make_parallel_env(env_id: str, kwargs: dict):
    """The PettingZoo env as a ParallelEnv (AEC envs converted)."""
    from pettingzoo.utils.conversions import aec_to_parallel

    module = _import_env_module(env_id)
    parallel = hasattr(module, "parallel_env")
    if not parallel and not hasattr(module, "env"):
        raise ConfigError(f"env.id {env_id!r} is a module without parallel_env() or env(): not a PettingZoo env")
    try:
        env = module.parallel_env(**kwargs) if parallel else module.env(**kwargs)
    except TypeError as e:
        raise ConfigError(f"env.kwargs for {env_id!r} are not accepted (or the env failed to build): {e}") from None
    if parallel:
        return env
    if not env.metadata.get("is_parallelizable", False):
        env.close()
        raise ConfigError(f"env.id {env_id!r} is a turn-based AEC env (metadata is_parallelizable is false), which "
                          "PettingZoo cannot convert to the parallel API RLlib's wrapper needs: not supported")
    return aec_to_parallel(env)


def make_multi_agent_env(env: EnvConfig, video: Optional[dict] = None):
    """The PettingZoo env wrapped for RLlib (``make_env`` calls this for ``env.kind: pettingzoo``);
    ``video``: record its first episodes (``tasks.video``), rendering with ``render_mode="rgb_array"``."""
    from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

    if not video:
        return ParallelPettingZooEnv(make_parallel_env(env.id, env.kwargs))
    from .video import parallel_episode_video

    par = make_parallel_env(env.id, {**env.kwargs, "render_mode": "rgb_array"})
    if "rgb_array" not in (par.metadata.get("render_modes") or []):
        par.close()
        raise ConfigError(f"env {env.id!r} cannot render rgb_array frames, so it cannot be recorded; drop --video")
    return ParallelPettingZooEnv(parallel_episode_video(par, video["dir"], int(video["episodes"]),
                                                        video.get("prefix", "episode")))


@dataclass(frozen=True)
class AgentSpaces:
    """What the build needs to know of a PettingZoo env, read once on the driver."""

    agents: tuple[str, ...]  # possible_agents, in the env's order
    observation: dict[str, gym.Space]
    action: dict[str, gym.Space]


def check_pettingzoo_env(env_id: str, kwargs: dict, *, diffusion: bool) -> AgentSpaces:
    """Build the env once, check every agent's spaces, close it."""
    env = make_parallel_env(env_id, kwargs)
    try:
        agents = tuple(env.possible_agents)
        obs = {a: env.observation_space(a) for a in agents}
        act = {a: env.action_space(a) for a in agents}
    finally:
        env.close()
    for a in agents:
        if not (isinstance(obs[a], gym.spaces.Box) and len(obs[a].shape) == 1):
            raise ConfigError(f"env {env_id!r}: agent {a!r} has observation space {obs[a]}; a flat (1-D) Box "
                              "is needed (image observations are not supported for multi-agent envs)")
        box = isinstance(act[a], gym.spaces.Box) and len(act[a].shape) == 1
        if not (box or isinstance(act[a], gym.spaces.Discrete)):
            what = "the diffusion policy supports" if diffusion else "multi-agent runs here support"
            raise ConfigError(f"env {env_id!r}: agent {a!r} has action space {act[a]}; {what} "
                              "1-D Box and Discrete action spaces only")
    return AgentSpaces(agents, obs, act)


def policy_mapping(policies: str, groups: dict, spaces: AgentSpaces) -> dict[str, str]:
    """agent id -> policy (module) id; agents sharing a policy must have the same spaces."""
    if policies == "auto":
        return _auto_mapping(spaces)
    if policies == "shared":
        mapping = {a: SHARED_POLICY for a in spaces.agents}
    elif policies == "independent":
        mapping = {a: a for a in spaces.agents}
    else:
        mapping = {}
        for name, pattern in groups.items():
            matched = [a for a in spaces.agents if fnmatch.fnmatchcase(a, pattern)]
            if not matched:
                raise ConfigError(f"multi_agent.groups.{name}: pattern {pattern!r} matches no agent; agents: "
                                  f"{', '.join(spaces.agents)}")
            for a in matched:
                if a in mapping:
                    raise ConfigError(f"multi_agent.groups: agent {a!r} matches both {mapping[a]!r} and {name!r}")
                mapping[a] = name
        left = [a for a in spaces.agents if a not in mapping]
        if left:
            raise ConfigError(f"multi_agent.groups: agent(s) {', '.join(left)} match no pattern; add a group for them")
    first: dict[str, str] = {}
    for a, pid in mapping.items():
        ref = first.setdefault(pid, a)
        if (spaces.observation[a], spaces.action[a]) != (spaces.observation[ref], spaces.action[ref]):
            raise ConfigError(
                f"agents {ref!r} and {a!r} share policy {pid!r} but their spaces differ "
                f"({spaces.observation[ref].shape}, {spaces.action[ref]} vs {spaces.observation[a].shape}, "
                f"{spaces.action[a]}); use multi_agent.policies: independent or groups"
            )
    return mapping


def _auto_mapping(spaces: AgentSpaces) -> dict[str, str]:
    """``policies: auto``: agents with the same (observation, action) spaces share a policy; one
    kind of agent -> ``shared``, several -> each named by its agents' common name prefix without
    the trailing index (speaker_0 -> speaker; adversary_0, adversary_1 -> adversary), or by its
    first agent where prefixes are empty or clash."""
    kinds: list[tuple[tuple, list[str]]] = []
    for a in spaces.agents:
        signature = (spaces.observation[a], spaces.action[a])
        for sig, members in kinds:
            if sig == signature:
                members.append(a)
                break
        else:
            kinds.append((signature, [a]))
    if len(kinds) == 1:
        return {a: SHARED_POLICY for a in spaces.agents}
    names = [re.sub(r"[^A-Za-z0-9_-]", "_", os.path.commonprefix(members)).rstrip("0123456789_-") or members[0]
             for _, members in kinds]
    names = [n if names.count(n) == 1 else members[0] for n, (_, members) in zip(names, kinds)]
    return {a: name for name, (_, members) in zip(names, kinds) for a in members}


def describe_mapping(mapping: dict[str, str]) -> str:
    """'policy <- agents' for each policy, for the start line."""
    by_policy: dict[str, list[str]] = {}
    for agent, pid in mapping.items():
        by_policy.setdefault(pid, []).append(agent)
    return "; ".join(f"{pid} <- {', '.join(agents)}" for pid, agents in by_policy.items())
