"""The task side: env factories and checks."""

import os
import sys

# MuJoCo picks its OpenGL backend when first imported; without a display the default (glfw)
# cannot render, EGL can (Mesa's software EGL on a CPU-only machine). Set before any import
# of mujoco in this process; Ray workers inherit it from the driver. An explicit setting wins.
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")
