"""Meta-World manipulation tasks (``env: {kind: metaworld, id: pick-place-v3, goal: random}``).

One task of Meta-World's MT1 benchmark (its 50 training variations of object and goal
positions), built from Meta-World's own classes: ``goal: random`` draws a variation at every
reset (``RandomTaskSelectWrapper``), ``goal: fixed`` always uses the first one. Episodes run
Meta-World's ``max_path_length`` (500) steps; ``info["success"]`` is Meta-World's success flag,
which the training callback and ``ncdpo evaluate`` turn into a success rate (an episode
succeeds if the flag was set at any step, as Meta-World's benchmarks count it).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from ncdpo_rllib.errors import ConfigError, one_line, unknown_name

from .config import EnvConfig

MT1_SEED = 0
"""Seed of the MT1 benchmark object: fixes the 50 variations (and the ``fixed`` one) across runs."""


class MetaWorldObservations(gym.ObservationWrapper):
    """float32 observations in a space that contains them: Meta-World declares the goal
    entries' bounds as [0, 0] (its partially observable default) although MT1 tasks show the goal."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        shape = env.observation_space.shape
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape, np.float32)

    def observation(self, observation):
        return np.asarray(observation, dtype=np.float32)


def _import_metaworld():
    """metaworld, or a one-line error: importing it imports mujoco, which loads the OpenGL
    backend named by MUJOCO_GL and fails if that library is missing (e.g. osmesa)."""
    try:
        import metaworld
    except (AttributeError, ImportError, OSError) as e:
        if isinstance(e, ModuleNotFoundError) and e.name not in ("OpenGL", None):
            raise ConfigError(f"env.kind: metaworld needs the {e.name} package (pip install -e . installs "
                              "metaworld 3.1.1 and mujoco 3.3.0)") from None
        from .pixels import gl_hint

        raise ConfigError(f"mujoco could not load its OpenGL backend ({type(e).__name__}: "
                          f"{one_line(e, 120)}); {gl_hint()}") from None
    return metaworld


def task_names() -> list[str]:
    return sorted(_import_metaworld().ALL_V3_ENVIRONMENTS)


def check_task(name: str) -> None:
    names = task_names()
    if name not in names:
        raise ConfigError(unknown_name("env.id", name, "a Meta-World task", names, listed=6))


def make_metaworld_env(cfg: EnvConfig, pixels: bool = True) -> gym.Env:
    """The MT1 task ``cfg.id`` with ``cfg.goal`` (random | fixed), ``cfg.kwargs`` (passed to the task
    class), ``cfg.max_episode_steps`` (default Meta-World's 500) and, for pixels, the camera image
    (appended here unless ``pixels`` is false: ``make_env`` then adds it above the chunking)."""
    metaworld = _import_metaworld()
    from metaworld.wrappers import RandomTaskSelectWrapper

    name = cfg.id
    check_task(name)
    benchmark = metaworld.MT1(name, seed=MT1_SEED)
    try:
        env = benchmark.train_classes[name](**cfg.kwargs)
    except TypeError as e:
        raise ConfigError(f"env.kwargs for Meta-World task {name!r} are not accepted: {e}") from None
    tasks = list(benchmark.train_tasks)
    if cfg.goal == "fixed":
        tasks = tasks[:1]
    env.set_task(tasks[0])
    limit = cfg.max_episode_steps or env.max_path_length
    if limit > env.max_path_length:
        raise ConfigError(f"env.max_episode_steps {limit} exceeds Meta-World's max_path_length {env.max_path_length}")
    env = gym.wrappers.TimeLimit(env, limit)
    env = RandomTaskSelectWrapper(env, tasks)
    env = MetaWorldObservations(env)
    if pixels and cfg.pixels:
        from .pixels import PixelObservations

        env = PixelObservations(env, cfg.image_size, cfg.cameras)
    return env


def scripted_policy(name: str):
    """Meta-World's scripted expert for a task (``SawyerPickPlaceV3Policy`` for pick-place-v3)."""
    _import_metaworld()
    import metaworld.policies as policies

    class_name = "Sawyer" + "".join(part.capitalize() for part in name.replace("-v3", "").split("-")) + "V3Policy"
    if not hasattr(policies, class_name):
        raise ConfigError(f"Meta-World has no scripted policy {class_name} for {name!r}")
    return getattr(policies, class_name)()
