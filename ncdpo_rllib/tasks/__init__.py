"""The task side: env factories and checks."""

import ctypes.util
import os
import sys

# MuJoCo picks its OpenGL backend when first imported; without a display the default (glfw)
# cannot render, EGL can (Mesa's software EGL on a CPU-only machine). Set before any import
# of mujoco in this process (Ray workers import this package before building an env), and
# only where libEGL exists: mujoco fails to import with a backend whose library is missing,
# which would break state-only MuJoCo envs too. An explicit setting wins.
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and ctypes.util.find_library("EGL"):
    os.environ.setdefault("MUJOCO_GL", "egl")
