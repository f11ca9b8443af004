"""RLlib callbacks: per-iteration episode statistics.

RLlib's ``episode_return_mean`` is smoothed over the last 100 episodes; researchers
comparing curves want the mean over the episodes that ended in *this* iteration too.
Windowless mean/min/max stats are cleared at each reduce, i.e. once per iteration.
"""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback

ITER_RETURN_MEAN = "iter_return_mean"
ITER_RETURN_MIN = "iter_return_min"
ITER_RETURN_MAX = "iter_return_max"
ITER_EPISODE_LEN = "iter_episode_len_mean"


class EpisodeReturnCallback(RLlibCallback):
    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        if metrics_logger is None:
            return
        ret = float(episode.get_return())
        metrics_logger.log_value(ITER_RETURN_MEAN, ret, reduce="mean")
        metrics_logger.log_value(ITER_RETURN_MIN, ret, reduce="min")
        metrics_logger.log_value(ITER_RETURN_MAX, ret, reduce="max")
        metrics_logger.log_value(ITER_EPISODE_LEN, float(len(episode)), reduce="mean")
