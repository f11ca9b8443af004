"""Rollout videos: the first episodes an env runs, one MP4 per episode (``ncdpo evaluate --video N``).

PettingZoo envs (MPE and others that render ``rgb_array``) are recorded at the parallel-env level,
one frame per env step, before RLlib's wrapper.

``EpisodeVideo`` sits right on the base env (below the action-chunk wrapper), so a video has one
frame per env step, rendered after the step. Gymnasium envs render with ``render_mode="rgb_array"``
(their own camera, e.g. the one tracking Hopper); Meta-World renders ``env.camera`` at
``VIDEO_SIZE`` (not the policy's 64x64 input). Files are written whole (a temporary name, then a
rename), with imageio's ffmpeg (``imageio-ffmpeg`` ships its own binary).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np

VIDEO_SIZE = 256
"""Side of a Meta-World video frame, in pixels."""


class VideoWriter:
    """Frames of the current episode, written to ``out_dir/<prefix>-NNN.mp4`` when it ends, for the
    first ``episodes`` episodes; ``written`` lists the files."""

    def __init__(self, out_dir: str, episodes: int, fps: float, prefix: str = "episode"):
        self.out_dir, self.episodes, self.fps, self.prefix = Path(out_dir), episodes, fps, prefix
        self.written: list[Path] = []
        self.frames: list[np.ndarray] = []

    @property
    def recording(self) -> bool:
        return len(self.written) < self.episodes

    def arm(self, episodes: int = 1) -> None:
        """Record the next ``episodes`` episodes that start (training-time evaluation videos)."""
        self.episodes = len(self.written) + episodes

    def add(self, frame, episode_over: bool) -> None:
        if not self.recording:
            return
        self.frames.append(np.asarray(frame, dtype=np.uint8))
        if episode_over:
            self._write()

    def _write(self) -> None:
        import imageio.v2 as imageio

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.prefix}-{len(self.written):03d}.mp4"
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.mp4")
        try:
            imageio.mimwrite(tmp, self.frames, fps=self.fps, macro_block_size=1)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        self.written.append(path)
        self.frames = []


class EpisodeVideo(gym.Wrapper):
    """A Gymnasium env whose first episodes are recorded (``VideoWriter``), one frame per step."""

    def __init__(self, env: gym.Env, out_dir: str, episodes: int, frame: Callable[[], np.ndarray], fps: float,
                 prefix: str = "episode"):
        super().__init__(env)
        self.frame = frame
        self.video = VideoWriter(out_dir, episodes, fps, prefix)

    def reset(self, **kwargs):
        self.video.frames = []
        return self.env.reset(**kwargs)

    def step(self, action):
        out = self.env.step(action)
        if self.video.recording:
            self.video.add(self.frame(), out[2] or out[3])
        return out

    def close(self):
        close = getattr(self.frame, "close", None)
        if close is not None:  # the camera's GL context goes before the env (no "Exception ignored" at exit)
            close()
        super().close()


def parallel_episode_video(env, out_dir: str, episodes: int, prefix: str = "episode"):
    """The same for a PettingZoo ParallelEnv made with ``render_mode="rgb_array"``: one frame per
    env step (all agents), the episode over when no agent is left."""
    from pettingzoo.utils.wrappers import BaseParallelWrapper

    class ParallelEpisodeVideo(BaseParallelWrapper):
        def __init__(self, env):
            super().__init__(env)
            self.video = VideoWriter(out_dir, episodes, float(env.metadata.get("render_fps") or 10), prefix)

        def reset(self, seed=None, options=None):
            self.video.frames = []
            return self.env.reset(seed=seed, options=options)

        def step(self, actions):
            out = self.env.step(actions)
            if self.video.recording:
                over = not self.env.agents or all(out[2].get(a) or out[3].get(a) for a in actions)
                self.video.add(self.env.render(), over)
            return out

    return ParallelEpisodeVideo(env)


class CameraFrames:
    """A MuJoCo camera's frames of ``env`` for its video (Meta-World, robosuite), with ``close``
    for the renderer's GL context."""

    def __init__(self, env: gym.Env, camera: str):
        from .pixels import CameraRenderer, flips

        self.env = env.unwrapped
        self.renderer = CameraRenderer(self.env.model, VIDEO_SIZE, camera, flip=flips(env))

    def __call__(self) -> np.ndarray:
        return self.renderer.render(self.env.data)

    def close(self) -> None:
        self.renderer.close()


def video_frames(env: gym.Env, kind: str, camera: str) -> Callable[[], np.ndarray]:
    """How to render a frame of ``env`` (made with ``render=True``), for the video."""
    if kind in ("metaworld", "robosuite"):
        return CameraFrames(env, camera)
    return env.render


def video_fps(env: gym.Env) -> float:
    fps = env.metadata.get("render_fps")
    if fps:
        return float(fps)
    dt = getattr(env.unwrapped, "dt", None)
    return float(1.0 / dt) if dt else 30.0

