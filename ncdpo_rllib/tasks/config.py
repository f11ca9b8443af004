"""The task's configuration: the env, its image encoder and its agents (the ``env``, ``encoder`` and
``multi_agent`` sections of an experiment file). ``make_env`` and ``check_env`` take these."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional


DEFAULT_CAMERAS = {"metaworld": "corner2", "robosuite": "agentview"}
"""env.camera when it is null, per env family (the others keep Meta-World's, unused)."""


@dataclass
class EnvConfig:
    """The task."""

    id: str = "Pendulum-v1"
    """gymnasium: a registered env id (``Pendulum-v1``, ``HalfCheetah-v5``); pettingzoo: an
    importable module with ``parallel_env()`` or ``env()`` (``mpe2.simple_spread_v3``,
    ``pettingzoo.sisl.multiwalker_v9``)."""
    kind: Literal["gymnasium", "pettingzoo", "metaworld", "robosuite"] = "gymnasium"
    """Env family: a single-agent Gymnasium env; a multi-agent PettingZoo env (parallel API;
    AEC envs are converted with ``aec_to_parallel``), see the ``multi_agent`` section; a
    Meta-World MT1 task (``id: pick-place-v3``); or a robosuite task (``id: Lift``,
    ``PickPlaceCan``, ``NutAssemblySquare``: robomimic's family, OSC_POSE control at 20 Hz).
    Meta-World and robosuite log a success rate with the return."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for ``gymnasium.make`` / the PettingZoo constructor / the Meta-World task
    class / ``robosuite.make`` (e.g. ``reward_shaping: false`` for robosuite's sparse reward)."""
    robots: str = "Panda"
    """robosuite only: the arm (robosuite's robot name)."""
    obs_keys: list[str] = field(default_factory=list)
    """robosuite only: the observation keys, concatenated in this order (empty = robomimic's
    low-dim keys: robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos, object)."""
    goal: Literal["random", "fixed"] = "random"
    """metaworld only: a new object/goal variation (of MT1's 50) at every reset, or always the first."""
    normalize_observations: bool = True
    """RLlib's MeanStdFilter connector; its statistics are saved in checkpoints. Ignored with
    ``init_from``: a pre-trained module normalises with its dataset's statistics."""
    action_chunk: int = 1
    """Ta: actions per policy step, executed in order with rewards summed (DPPO's act steps)."""
    obs_history: int = 1
    """To: the policy sees the last To observations, concatenated (with pixels: the last To
    frames, stacked as channels)."""
    max_episode_steps: Optional[int] = None
    """Truncate episodes after this many env steps (null = the env's own limit; Meta-World: 500)."""
    observation: Literal["state", "pixels", "pixels_state"] = "state"
    """metaworld only: what the policy and critic see. pixels = a rendered camera image
    (``image_size`` square, ``camera``), encoded by the ``encoder`` section; pixels_state =
    the image and the state vector. Needs MuJoCo offscreen rendering (``MUJOCO_GL=egl``,
    set by default on Linux without a display). RLlib's MeanStdFilter is not used with
    pixels (``normalize_observations`` is ignored): images are scaled to [0, 1] in the encoder."""
    image_size: int = 64
    """Pixels: frame width and height (64 or 84 fit a CPU)."""
    camera: Optional[str] = None
    """Pixels (and videos of Meta-World and robosuite tasks): the MuJoCo camera to render
    (Meta-World: corner, corner2, corner3, corner4, topview, behindGripper, gripperPOV; robosuite:
    agentview, robot0_eye_in_hand, frontview, birdview, sideview). null = the family's
    (``DEFAULT_CAMERAS``): corner2 for Meta-World, agentview for robosuite."""
    extra_cameras: list[str] = field(default_factory=list)
    """Pixels: more cameras, each rendered at ``image_size`` and appended after ``camera``'s image
    (e.g. ``[robot0_eye_in_hand]``, robomimic's wrist camera, with ``camera: agentview``). The
    encoder stacks all views as channels, like the frames of ``obs_history``; videos show ``camera``."""

    def __post_init__(self):
        if self.action_chunk < 1 or self.obs_history < 1:
            raise ValueError("env: action_chunk and obs_history must be >= 1")
        if self.goal != "random" and self.kind != "metaworld":
            raise ValueError("env: goal is for kind: metaworld")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError("env: max_episode_steps must be >= 1 (or null)")
        if self.observation != "state" and self.kind not in ("metaworld", "robosuite"):
            raise ValueError("env: observation: pixels is implemented for kind: metaworld and robosuite")
        if self.kind != "robosuite" and (self.robots != "Panda" or self.obs_keys):
            raise ValueError("env: robots and obs_keys are for kind: robosuite")
        if not 16 <= self.image_size <= 256:
            raise ValueError("env: image_size must be between 16 and 256")
        default_camera = DEFAULT_CAMERAS.get(self.kind, DEFAULT_CAMERAS["metaworld"])
        if self.observation == "state" and (self.image_size != 64 or self.camera not in (None, default_camera)):
            raise ValueError("env: image_size and camera are for observation: pixels or pixels_state")
        if self.camera is None:
            self.camera = default_camera
        if self.extra_cameras and self.observation == "state":
            raise ValueError("env: extra_cameras are for observation: pixels or pixels_state")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"env: camera and extra_cameras name a camera twice ({', '.join(self.cameras)})")
        if self.max_episode_steps is not None and "max_episode_steps" in self.kwargs:
            raise ValueError("env: max_episode_steps is set twice (also in env.kwargs); keep env.max_episode_steps")

    @property
    def pixels(self) -> bool:
        return self.observation != "state"

    @property
    def cameras(self) -> list[str]:
        """Every camera whose image the observation holds, in order: ``camera``, then ``extra_cameras``."""
        return [self.camera, *self.extra_cameras]


@dataclass
class EncoderConfig:
    """Image encoder of the actor and (a separate one) of the critic, with ``env.observation: pixels``."""

    type: Literal["cnn", "vit"] = "cnn"
    """cnn = three strided convolutions (Nature-DQN shape: 8/4, 4/2, 3/1, 16-32-32 channels),
    then Linear + LayerNorm + tanh (DrQ's trunk); vit = a small ViT (patches of image_size/8,
    width 64, 2 pre-norm blocks of 4 heads, mean-pooled), as DPPO uses for images."""
    feature_dim: int = 64
    """Image feature width (the state vector, with pixels_state, is concatenated after it)."""
    random_shift: int = 4
    """DrQ's random-shift augmentation: pad by this many pixels (replicate) and crop back at a
    random offset, per sample; used in behaviour cloning (0 = off)."""
    shift_in_finetune: bool = False
    """Also shift in the PPO update's forward passes (actor and critic). Off by default: the
    rollout saw unshifted frames, so shifting makes the first minibatch's ratio differ from 1."""

    def __post_init__(self):
        if self.feature_dim < 1 or self.random_shift < 0:
            raise ValueError("encoder: feature_dim must be >= 1 and random_shift >= 0")


@dataclass
class MultiAgentConfig:
    """PettingZoo envs (``env.kind: pettingzoo``): which agents share a policy, and the critic."""

    policies: Literal["auto", "shared", "independent", "groups"] = "auto"
    """auto = one policy per distinct (observation, action) space: shared by all agents when their
    spaces match, else one per kind of agent (named by the agents' common prefix, e.g. speaker,
    listener); shared = one policy for all agents (parameter sharing); independent = one per
    agent; groups = one per entry of ``groups``. Agents sharing a policy need the same spaces."""
    groups: dict = field(default_factory=dict)
    """policies: groups only: policy name -> agent-name glob (``adversary_*``); every agent
    must match exactly one pattern, every pattern at least one agent."""
    central_critic: bool = False
    """MAPPO's centralised critic: each agent's value function also sees every agent's
    observation (zeros for agents no longer in the episode) and an alive bit per agent;
    the actor sees its own observation only."""

    def __post_init__(self):
        if self.policies == "groups" and not self.groups:
            raise ValueError("multi_agent: policies: groups needs groups: {policy name: agent-name pattern}")
        if self.groups and self.policies != "groups":
            raise ValueError("multi_agent: groups is only read with policies: groups")
        for name, pattern in self.groups.items():
            if not isinstance(pattern, str) or not isinstance(name, str):
                raise ValueError(f"multi_agent.groups: {name!r}: {pattern!r} must map a name to a glob string")
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"multi_agent.groups: policy name {name!r} may use letters, digits, _ and - only "
                                 "(it names checkpoint directories and MLflow keys)")
