"""robosuite manipulation tasks, the family of robomimic's datasets
(``env: {kind: robosuite, id: Lift, robots: Panda}``).

robosuite's own env classes with its operational-space controller (``OSC_POSE``: a 6-D end-effector
delta and the gripper, each in [-1, 1]) at 20 Hz, wrapped as a Gymnasium env:

- observations: the robomimic low-dimensional keys (``env.obs_keys``; default
  ``robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos, object``; ``object`` is robosuite's
  ``object-state``), concatenated in that order as float32;
- ``info["success"]``: the task's own success check, every step (the training callback and
  ``ncdpo evaluate`` turn it into a success rate, as for Meta-World);
- episodes are truncated after ``env.max_episode_steps`` (default ``HORIZON``) and never terminate;
- pixels: the shared ``PixelObservations`` (MuJoCo's renderer on robosuite's model, camera
  ``env.camera``, e.g. ``agentview``), so images look and are stored as for Meta-World.

robosuite draws its initial object placements and robot noise from NumPy's global generator:
``reset(seed=...)`` seeds that generator (one env per process is what makes this reproducible;
RLlib's EnvRunners step their envs in order, so several per runner stay deterministic too).
"""

from __future__ import annotations

import logging
from typing import Optional

import gymnasium as gym
import numpy as np

from ncdpo_rllib.errors import ConfigError, one_line, unknown_name

from .config import EnvConfig

HORIZON = 400
"""Default episode length in env steps (robomimic's evaluation horizon for Lift, PickPlaceCan and
NutAssemblySquare)."""
DEFAULT_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
"""robomimic's low-dimensional observation keys."""
ROBOMIMIC_NAMES = {"object": "object-state"}
"""robomimic's name for a robosuite observation key -> robosuite's."""
CONTROLLER = "OSC_POSE"
SETTINGS = {
    "has_renderer": False,
    "has_offscreen_renderer": False,  # pixels come from PixelObservations' own renderer
    "use_camera_obs": False,
    "use_object_obs": True,
    "reward_shaping": True,
    "control_freq": 20,
    "ignore_done": True,  # the TimeLimit truncates
    "hard_reset": False,  # keep one MuJoCo model: the camera renderer holds it
}
"""robosuite.make's arguments that the project sets; ``env.kwargs`` override them (except
``ignore_done`` and ``hard_reset``)."""
FIXED = ("ignore_done", "hard_reset", "horizon", "robots", "controller_configs")


def import_robosuite():
    """robosuite (its start-up notes silenced), or a one-line error."""
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)  # "No private macro file found!" x3
    try:
        import robosuite
    except (AttributeError, ImportError, OSError) as e:
        if isinstance(e, ModuleNotFoundError):
            raise ConfigError(f"env.kind: robosuite needs the {e.name} package (make install installs robosuite "
                              "1.4.1: pip install --no-deps -r requirements-nodeps.txt)") from None
        from .pixels import gl_hint

        raise ConfigError(f"robosuite failed to import ({type(e).__name__}: {one_line(e, 120)}); {gl_hint()}") from None
    return robosuite


def task_names() -> list[str]:
    """Single-arm robosuite tasks (the two-arm ones need two robots)."""
    return sorted(n for n in import_robosuite().ALL_ENVIRONMENTS if not n.startswith("TwoArm"))


def check_task(name: str) -> None:
    names = task_names()
    if name not in names:
        raise ConfigError(unknown_name("env.id", name, "a single-arm robosuite task", names, listed=len(names)))


def state_keys(obs_keys=None) -> list[str]:
    """The low-dimensional observation keys: ``obs_keys`` (``env.obs_keys`` or ``--obs-keys``), or
    ``DEFAULT_OBS_KEYS`` when none are given."""
    return list(obs_keys or DEFAULT_OBS_KEYS)


def robomimic_keys(cfg: EnvConfig) -> list[str]:
    """The robomimic observation keys of this env section, in order: ``env.obs_keys`` (default
    ``DEFAULT_OBS_KEYS``), then ``<camera>_image`` per camera with pixels (the [state, images] layout)."""
    return [*state_keys(cfg.obs_keys), *([f"{camera}_image" for camera in cfg.cameras] if cfg.pixels else [])]


class RobosuiteEnv(gym.Env):
    """One robosuite task as a Gymnasium env (see the module's docstring)."""

    metadata = {"render_modes": [], "render_fps": 20}
    upright_cameras = True  # MuJoCo's Renderer shows robosuite's cameras the right way up (pixels.flips)

    def __init__(self, name: str, robots: str, obs_keys, kwargs: Optional[dict] = None):
        suite = import_robosuite()
        check_task(name)
        fixed = sorted(set(kwargs or {}) & set(FIXED))
        if fixed:
            raise ConfigError(f"env.kwargs may not set {', '.join(fixed)} for a robosuite task: the project sets "
                              "them (robots: env.robots; horizon: env.max_episode_steps)")
        if robots not in suite.ALL_ROBOTS:
            raise ConfigError(f"env.robots {robots!r} is not a robosuite robot; choose one of {', '.join(sorted(suite.ALL_ROBOTS))}")
        settings = SETTINGS | dict(kwargs or {})
        try:
            self._env = suite.make(name, robots=robots, controller_configs=suite.load_controller_config(
                default_controller=CONTROLLER), horizon=10**9, **settings)
        except TypeError as e:
            raise ConfigError(f"env.kwargs for robosuite task {name!r} are not accepted: {one_line(e, 160)}") from None
        first, self.steps = self._env.reset(), 0
        self.obs_keys = state_keys(obs_keys)
        self.obs_slices, start = {}, 0
        for key in self.obs_keys:
            source = ROBOMIMIC_NAMES.get(key, key)
            if source not in first:
                raise ConfigError(f"env.obs_keys: {key!r} is not an observation of robosuite's {name}; it has "
                                  f"{', '.join(sorted(first))} (and 'object' for object-state)")
            size = int(np.asarray(first[source]).size)
            self.obs_slices[key] = slice(start, start + size)
            start += size
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (start,), np.float32)
        low, high = self._env.action_spec
        self.action_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)
        self.task = name

    # MuJoCo's model and data, for the camera renderer (PixelObservations) and videos.
    @property
    def model(self):
        return self._env.sim.model._model

    @property
    def data(self):
        return self._env.sim.data._data

    @property
    def raw_observation(self) -> dict:
        """robosuite's observation dict of the last reset or step (every observable, whatever
        ``obs_keys`` selects: the scripted experts read positions from it)."""
        return self._raw

    def _flat(self, obs: dict) -> np.ndarray:
        self._raw = obs
        return np.concatenate([np.asarray(obs[ROBOMIMIC_NAMES.get(k, k)], np.float32).reshape(-1)
                               for k in self.obs_keys])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            np.random.seed(seed % 2**32)
        self.steps = 0
        return self._flat(self._env.reset()), {"success": False}

    def step(self, action):
        obs, reward, _, info = self._env.step(np.asarray(action, dtype=np.float64))
        self.steps += 1
        info = dict(info, success=bool(self._env._check_success()))  # robomimic's is_success() reads the same
        return self._flat(obs), float(reward), False, False, info

    def close(self):
        self._env.close()


def make_robosuite_env(cfg: EnvConfig, pixels: bool = True) -> gym.Env:
    """The robosuite task ``cfg.id`` with ``cfg.robots``, ``cfg.obs_keys``, ``cfg.kwargs`` and
    ``cfg.max_episode_steps`` (default ``HORIZON``); for pixels, the camera image (appended here
    unless ``pixels`` is false: ``make_env`` then adds it above the chunking)."""
    env = RobosuiteEnv(cfg.id, cfg.robots, cfg.obs_keys, cfg.kwargs)
    env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps or HORIZON)
    if pixels and cfg.pixels:
        from .pixels import PixelObservations

        env = PixelObservations(env, cfg.image_size, cfg.cameras)
    return env


class ScriptedExpert:
    """What the scripted experts share: a phase machine restarted with every episode (robosuite's
    observation dict, ``raw_observation``, gives the positions, whatever ``obs_keys`` the policy
    sees) and the OSC_POSE action towards a target position."""

    GAIN = 10.0  # action per m of position error (OSC_POSE: an action of 1 moves the goal 5 cm)
    TURN_GAIN = 2.0  # action per radian of heading error (an action of 1 turns the goal 0.5 rad)

    def __init__(self, env: gym.Env):
        self.env = env.unwrapped
        self.restart()

    def restart(self) -> None:
        """The first phase of an episode."""
        raise NotImplementedError

    def get_action(self, obs=None) -> np.ndarray:
        if self.env.steps == 0:
            self.restart()
        return self.act(self.env.raw_observation)

    def act(self, raw: dict) -> np.ndarray:
        raise NotImplementedError

    def action(self, target, eef, gripper: float, turn: float = 0.0) -> np.ndarray:
        """Towards ``target`` (m), turning by ``turn`` (radians about the world's z axis; +:
        counter-clockwise), the gripper closing (1) or opening (-1)."""
        action = np.zeros(7)
        action[:3] = np.clip(self.GAIN * (np.asarray(target) - eef), -1.0, 1.0)
        action[5] = np.clip(self.TURN_GAIN * turn, -1.0, 1.0)
        action[6] = gripper
        return action


class PickPlaceExpert(ScriptedExpert):
    """A scripted pick (and place) expert: waypoints for OSC_POSE's position delta, gripper
    pointing down as the arm starts: above the object, down to it, close the gripper, lift; for a
    place task, carry it above its target and open the gripper."""

    ABOVE, DESCEND, CLOSE, LIFT, CARRY, RELEASE = range(6)
    OBJECT = "cube_pos"  # robosuite's observation of the object's position
    HOVER = 0.08  # m above the object before descending
    REACHED = 0.01  # m: a waypoint counts as reached
    CLOSE_STEPS = 8
    LIFT_BY = 0.2  # m

    def restart(self) -> None:
        self.phase, self.closed_for, self.lift_to = self.ABOVE, 0, None

    def place_target(self) -> Optional[np.ndarray]:
        """Where to carry the object after lifting it (None: lift only)."""
        return None

    def act(self, raw: dict) -> np.ndarray:
        eef, obj = np.asarray(raw["robot0_eef_pos"]), np.asarray(raw[self.OBJECT])
        gripper = -1.0
        if self.phase == self.ABOVE:
            target = obj + [0.0, 0.0, self.HOVER]
            if np.linalg.norm(target - eef) < self.REACHED:
                self.phase = self.DESCEND
        if self.phase == self.DESCEND:
            target = obj.copy()
            if np.linalg.norm(target - eef) < self.REACHED:
                self.phase = self.CLOSE
        if self.phase == self.CLOSE:
            target, gripper = obj.copy(), 1.0
            self.closed_for += 1
            if self.closed_for >= self.CLOSE_STEPS:
                self.phase, self.lift_to = self.LIFT, obj + [0.0, 0.0, self.LIFT_BY]
        if self.phase == self.LIFT:
            target, gripper = self.lift_to, 1.0
            place = self.place_target()
            if place is not None and np.linalg.norm(target - eef) < 3 * self.REACHED:
                self.phase, self.lift_to = self.CARRY, np.array([place[0], place[1], self.lift_to[2]])
        if self.phase == self.CARRY:
            target, gripper = self.lift_to, 1.0
            # within 4 cm above the target: held at full reach, the arm stops 2-3 cm short of its goal
            if np.linalg.norm((target - eef)[:2]) < 4 * self.REACHED:
                self.phase = self.RELEASE
        if self.phase == self.RELEASE:
            target, gripper = self.lift_to, -1.0
        return self.action(target, eef, gripper)


class LiftExpert(PickPlaceExpert):
    """Lift: pick the cube and lift it 20 cm."""


class CanExpert(PickPlaceExpert):
    """PickPlaceCan: pick the can, carry it above its bin (robosuite's ``target_bin_placements``)
    and drop it."""

    OBJECT = "Can_pos"

    def place_target(self) -> np.ndarray:
        suite_env = self.env._env
        return np.asarray(suite_env.target_bin_placements[suite_env.object_to_id["can"]])


def _yaw(quat_xyzw) -> float:
    """The heading (rotation about the world's z axis) of a robosuite quaternion (x, y, z, w)."""
    x, y, z, w = np.asarray(quat_xyzw, dtype=float)
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def _wrap(angle: float, period: float) -> float:
    """``angle`` wrapped to [-period/2, period/2)."""
    return float((angle + period / 2) % period - period / 2)


class SquareExpert(ScriptedExpert):
    """NutAssemblySquare: grasp the square nut by its handle (fingers across it), lift it, turn it
    square to the peg (the nut's heading is random; a square fits every quarter turn), carry its
    centre above the peg, lower it over the peg and let go. Position and heading are closed loops
    on the nut's observed pose; a nut that did not come up with the hand is grasped again, and one
    that sticks on the peg's top is lifted and lowered again."""

    ALIGN, DESCEND, CLOSE, LIFT, CARRY, LOWER, RELEASE = range(7)
    HOVER = 0.06  # m above the handle before descending
    REACHED = 0.006  # m
    TURNED = np.radians(3.0)  # a heading counts as reached
    CLOSE_STEPS = OPEN_STEPS = 10
    CARRY_Z = 1.05  # m: the handle's height while carrying (the peg's top is at 0.95)
    HELD_Z = 0.92  # m: a nut below this once the hand is up was not picked up (it rests at ~0.83)
    ON_PEG_Z = 0.90  # m: a nut centre below this, over the peg, is around it (the peg's top: 0.95)
    LOWER_STEPS = 40  # then the nut is stuck on the peg's top: back up and line it up again

    def restart(self) -> None:
        self.phase, self.counter = self.ALIGN, 0

    def _to(self, phase: int) -> None:
        self.phase, self.counter = phase, 0

    def act(self, raw: dict) -> np.ndarray:
        suite_env = self.env._env
        eef, nut = np.asarray(raw["robot0_eef_pos"]), np.asarray(raw["SquareNut_pos"])
        handle = np.array(suite_env.sim.data.site_xpos[suite_env.object_site_ids[0]])
        peg = np.array(suite_env.sim.data.body_xpos[suite_env.peg1_body_id])
        hand = _yaw(raw["robot0_eef_quat"])  # the fingers close along the hand's y axis
        nut_heading = _yaw(raw["SquareNut_quat"])  # the handle points along the nut's x axis
        self.counter += 1
        gripper, turn = -1.0, 0.0
        if self.phase in (self.ALIGN, self.DESCEND):
            # fingers across the handle (either way round): the hand's x axis along the handle
            turn = _wrap(nut_heading - hand, np.pi)
        if self.phase == self.ALIGN:
            target = handle + [0.0, 0.0, self.HOVER]
            if np.linalg.norm(target - eef) < self.REACHED and abs(turn) < self.TURNED:
                self._to(self.DESCEND)
        if self.phase == self.DESCEND:
            target = handle.copy()
            if np.linalg.norm(target - eef) < self.REACHED:
                self._to(self.CLOSE)
        if self.phase == self.CLOSE:
            target, gripper = eef.copy(), 1.0
            if self.counter >= self.CLOSE_STEPS:
                self._to(self.LIFT)
        if self.phase == self.LIFT:
            target, gripper = np.array([eef[0], eef[1], self.CARRY_Z]), 1.0
            if abs(self.CARRY_Z - eef[2]) < 3 * self.REACHED:
                self._to(self.CARRY if nut[2] > self.HELD_Z else self.ALIGN)  # not held: grasp again
        if self.phase in (self.CARRY, self.LOWER):
            gripper = 1.0
            turn = -_wrap(nut_heading, np.pi / 2)  # the peg is square to the world's axes
            offset = peg[:2] - nut[:2]
            target = eef + [offset[0], offset[1], 0.0]
            if self.phase == self.CARRY:
                target[2] = self.CARRY_Z
                if nut[2] < self.ON_PEG_Z:  # dropped on the way: grasp again
                    self._to(self.ALIGN)
                elif np.linalg.norm(offset) < self.REACHED and abs(turn) < self.TURNED:
                    self._to(self.LOWER)
            else:
                target[2] = eef[2] - 0.05
                if nut[2] < self.ON_PEG_Z:  # let it slide down the peg
                    self._to(self.RELEASE)
                elif self.counter > self.LOWER_STEPS:
                    self._to(self.CARRY)
        if self.phase == self.RELEASE:  # open in place, then rise clear of the nut
            target = eef if self.counter < self.OPEN_STEPS else np.array([eef[0], eef[1], self.CARRY_Z])
        return self.action(target, eef, gripper, turn)


EXPERTS = {"Lift": LiftExpert, "PickPlaceCan": CanExpert, "NutAssemblySquare": SquareExpert}


def scripted_policy(env: gym.Env):
    """The scripted expert of a robosuite task (``EXPERTS``), acting in ``env``."""
    task = env.unwrapped.task
    if task not in EXPERTS:
        raise ConfigError(f"no scripted expert for robosuite task {task!r}; scripted experts: {', '.join(EXPERTS)}")
    return EXPERTS[task](env)
