"""``ncdpo evaluate --video N``: one playable MP4 per episode, one frame per env step, logged with
the evaluation's MLflow run; an env that cannot render is a one-line error and writes nothing."""

import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, last_json, run_cli


class NoRenderEnv(gym.Env):
    """An env that declares no render modes."""

    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


@pytest.mark.slow
def test_training_and_evaluate_record_videos_with_one_frame_per_env_step_logged_to_mlflow(tmp_path):
    """Training with eval.every 1 and eval.video_every 2 over 3 iterations records evaluations 1 and
    3; then ``evaluate --video 2`` on the checkpoint records its first 2 of 3 episodes. Each file is
    playable (imageio reads every frame back), has one frame per env step (20-step episodes) and is
    logged to its MLflow run."""
    import imageio.v3 as iio

    (tmp_path / "tiny.yaml").write_text(TINY)
    uri = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    client = MlflowClient(uri["MLFLOW_TRACKING_URI"])
    proc = run_cli(["train", tmp_path / "tiny.yaml", "--set", "env.max_episode_steps=20", "--set", "stop.iterations=3",
                    "--set", "eval.every=1", "--set", "eval.episodes=1", "--set", "eval.video_every=2", "--json"],
                   tmp_path, uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    videos = sorted((tmp_path / summary["run_dir"] / "videos").glob("eval-*.mp4"))
    assert [v.name for v in videos] == ["eval-000000256.mp4", "eval-000000768.mp4"]  # after iterations 1 and 3
    logged = [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "videos")]
    assert logged == ["videos/eval-000000256.mp4", "videos/eval-000000768.mp4"]

    evaluated = run_cli(["evaluate", summary["checkpoint"], "--episodes", "3", "--video", "2", "--json"], tmp_path, uri)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    ev = last_json(evaluated.stdout)
    assert len(ev["videos"]) == 2 and all("/videos/evaluate-final-seed12345/episode-" in v for v in ev["videos"])
    for video in [*videos, *map(Path, ev["videos"])]:
        frames = iio.imread(video)
        assert frames.shape[0] == 20 and frames.shape[-1] == 3 and frames.std() > 0  # 20 env steps, not blank
    logged = [a.path for a in client.list_artifacts(ev["mlflow_run_id"], "videos")]
    assert logged == ["videos/episode-000.mp4", "videos/episode-001.mp4"]


def test_an_env_that_cannot_render_is_a_one_line_error_and_writes_nothing(tmp_path):
    from ncdpo_rllib.errors import ConfigError
    from ncdpo_rllib.tasks.config import EnvConfig
    from ncdpo_rllib.tasks.envs import env_context, make_env

    gym.register("NoRender-v0", entry_point=NoRenderEnv)
    video = {"dir": str(tmp_path / "videos"), "episodes": 1}
    with pytest.raises(ConfigError, match="'NoRender-v0' cannot render rgb_array frames"):
        make_env(env_context(EnvConfig(id="NoRender-v0"), video=video))
    assert not (tmp_path / "videos").exists()
    proc = run_cli(["evaluate", tmp_path / "nowhere", "--video", "5", "--episodes", "2"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_mujoco_camera_video_is_written_and_its_renderer_closed_with_the_env(tmp_path):
    """In a process of its own: the Meta-World env with a video, 3 steps, closed; the process exits
    without EGL's "Exception ignored" traceback (the renderer's GL context outliving the env)."""
    script = (
        "from ncdpo_rllib.tasks.config import EnvConfig\n"
        "from ncdpo_rllib.tasks.envs import env_context, make_env\n"
        "from ncdpo_rllib.tasks.video import EpisodeVideo\n"
        f"video = {{'dir': {str(tmp_path / 'videos')!r}, 'episodes': 1}}\n"
        "env = make_env(env_context(EnvConfig(kind='metaworld', id='reach-v3', max_episode_steps=3), video=video))\n"
        "recorder = env\n"
        "while not isinstance(recorder, EpisodeVideo):\n"
        "    recorder = recorder.env\n"
        "env.reset(seed=0)\n"
        "for _ in range(3):\n"
        "    env.step(env.action_space.sample())\n"
        "env.close()\n"
        "print('closed:', recorder.frame.renderer._renderer is None)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "closed: True" in proc.stdout
    assert "Exception ignored" not in proc.stderr and "EGLError" not in proc.stderr, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "videos").glob("*.mp4")] == ["episode-000.mp4"]
