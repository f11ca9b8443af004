"""Pixel observations: MuJoCo camera images appended to the state vector.

``env.observation: pixels | pixels_state`` makes every observation the flat float32 vector
``[state (k), image (H*W*3, uint8 values 0..255, row-major H, W, C)]`` (one image per camera,
``env.camera`` then ``env.extra_cameras``, in that order): one Box, so RLlib's
episodes, the action-chunk / observation-history wrapper, recorded datasets and
``make_windows`` handle it unchanged, and the policy's encoder
(``ncdpo_rllib.rl.encoders.ObservationEncoder``) splits it again. ``pixels`` means the
encoder ignores the state part (it stays in the vector for scripted experts and datasets).

Rendering is MuJoCo's offscreen renderer. On a machine without a display it needs
``MUJOCO_GL=egl`` (Mesa's EGL: Debian ``libegl1 libgl1-mesa-dri``; the CPU's llvmpipe is
enough) or ``MUJOCO_GL=osmesa`` (Debian ``libosmesa6``). ``ncdpo_rllib.tasks`` sets
``MUJOCO_GL=egl`` when it is unset on Linux without ``$DISPLAY`` and libEGL is installed.
Shadows, reflections and the skybox are switched off: on llvmpipe they cost ~4x the frame
time (19 vs 76 frames/s for a 64x64 frame of reach-v3, one process, measured while writing
this wrapper).
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np

from ncdpo_rllib.errors import ConfigError, one_line

CHANNELS = 3


def gl_hint() -> str:
    backend = os.environ.get("MUJOCO_GL", "<unset: glfw, which needs a display>")
    return (f"MUJOCO_GL={backend}: on a machine without a display set MUJOCO_GL=egl (Debian packages libegl1 "
            "libgl1-mesa-dri) or MUJOCO_GL=osmesa (libosmesa6), and make sure that library is installed")


def pixel_dim(image_size: int) -> int:
    return image_size * image_size * CHANNELS


def flips(env: gym.Env) -> bool:
    """Whether frames of this env's cameras are flipped vertically: Meta-World's corner cameras
    (the useful ones) render upside down without it (its others, topview, gripperPOV and
    behindGripper, come out flipped instead); an env class whose cameras are upright says so
    with ``upright_cameras = True`` (robosuite's)."""
    return not getattr(env.unwrapped, "upright_cameras", False)


class CameraRenderer:
    """MuJoCo's offscreen renderer for one camera at size x size, made at the first frame (building
    an env for its spaces opens no GL context); shadows, reflections and skybox off; frames
    flipped vertically if ``flip`` (see ``flips``)."""

    def __init__(self, model, size: int, camera: str, flip: bool = True):
        self.model, self.size, self.camera, self.flip = model, size, camera, flip
        self._renderer = None

    def render(self, data) -> np.ndarray:
        """(H, W, 3) uint8."""
        import mujoco

        if self._renderer is None:
            try:
                self._renderer = mujoco.Renderer(self.model, self.size, self.size)
            except Exception as e:  # mujoco raises FatalError / AttributeError without a GL context
                raise ConfigError(f"MuJoCo offscreen rendering is unavailable ({type(e).__name__}: "
                                  f"{one_line(e, 120)}); {gl_hint()}") from None
            flags = self._renderer.scene.flags
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                flags[flag] = 0
        self._renderer.update_scene(data, camera=self.camera)
        frame = self._renderer.render()
        return frame[::-1] if self.flip else frame

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


class PixelObservations(gym.ObservationWrapper):
    """Appends a rendered (image_size x image_size x 3) frame per camera (``cameras``, in order) to
    the state observation.

    The renderers are created at the first observation (building the env for its spaces opens
    no GL context) and closed with the env.
    """

    def __init__(self, env: gym.Env, image_size: int, cameras: list[str]):
        super().__init__(env)
        model = env.unwrapped.model
        names = [model.camera(i).name for i in range(model.ncam)]
        self.cameras = list(cameras)
        for i, camera in enumerate(self.cameras):
            if camera not in names:
                key = "env.camera" if i == 0 else "env.extra_cameras"
                raise ConfigError(f"{key} {camera!r} is not a camera of this task; choose one of {', '.join(names)}")
        self.image_size, self.camera = image_size, self.cameras[0]
        state = env.observation_space
        self.state_dim = int(np.prod(state.shape))
        pixels = pixel_dim(image_size) * len(self.cameras)
        low = np.concatenate([np.full(self.state_dim, -np.inf), np.zeros(pixels)]).astype(np.float32)
        high = np.concatenate([np.full(self.state_dim, np.inf), np.full(pixels, 255.0)]).astype(np.float32)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self._renderers = [CameraRenderer(model, image_size, camera, flip=flips(env)) for camera in self.cameras]

    def render_frames(self) -> list[np.ndarray]:
        """(H, W, 3) uint8 per camera."""
        return [renderer.render(self.env.unwrapped.data) for renderer in self._renderers]

    def observation(self, observation):
        frames = [frame.reshape(-1).astype(np.float32) for frame in self.render_frames()]
        return np.concatenate([np.asarray(observation, dtype=np.float32).reshape(-1), *frames])

    def close(self):
        for renderer in self._renderers:
            renderer.close()
        super().close()
