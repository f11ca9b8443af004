"""Map the typed ExperimentConfig onto an RLlib AlgorithmConfig (NCDPO or the MLP+PPO baseline)."""

from __future__ import annotations

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPOConfig

from ncdpo_rllib.rl import NCDPOConfig, mean_std_filter_connector
from ncdpo_rllib.rl.callbacks import EpisodeReturnCallback

from .config import ExperimentConfig


def build_algo_config(exp: ExperimentConfig) -> AlgorithmConfig:
    p, r = exp.ppo, exp.resources
    if exp.algorithm == "ncdpo":
        cfg = NCDPOConfig().diffusion(exp.diffusion, critic_hidden=p.critic_hidden)
        cfg.training(
            critic_lr=p.critic_lr,
            actor_grad_clip=p.actor_grad_clip,
            critic_grad_clip=p.critic_grad_clip,
            target_kl=p.target_kl,
        )
    else:  # MLP+PPO baseline: RLlib's PPO with its default MLP module, same PPO knobs.
        cfg = PPOConfig().training(grad_clip=p.grad_clip, use_kl_loss=False)
    cfg.environment(env=exp.env.id, env_config=dict(exp.env.kwargs))
    cfg.env_runners(
        num_env_runners=r.env_runners,
        num_envs_per_env_runner=r.envs_per_runner,
        num_cpus_per_env_runner=r.cpus_per_runner,
        env_to_module_connector=mean_std_filter_connector if exp.env.normalize_observations else None,
    )
    cfg.learners(num_learners=r.learners, num_gpus_per_learner=r.gpus_per_learner)
    cfg.training(
        lr=p.lr,
        gamma=p.gamma,
        lambda_=p.gae_lambda,
        clip_param=p.clip_param,
        vf_clip_param=p.vf_clip_param,
        vf_loss_coeff=p.vf_loss_coeff,
        entropy_coeff=p.entropy_coeff,
        num_epochs=p.num_epochs,
        minibatch_size=p.minibatch_size,
        train_batch_size_per_learner=p.train_batch_size,
    )
    cfg.callbacks(EpisodeReturnCallback)
    cfg.debugging(seed=exp.seed, log_level="ERROR")
    return cfg
