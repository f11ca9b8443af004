"""Each RLlib link on its own: EnvRunner -> episodes -> learner batch -> Learner.

Real ``SingleAgentEnvRunner`` and real ``NCDPOTorchLearner`` built in-process (no Ray
cluster needed), on the real Pendulum-v1 env with the MeanStdFilter connector.
"""

import numpy as np
import pytest
import torch

from ray.rllib.core.columns import Columns

from ncdpo_rllib.diffusion import gaussian_log_prob
from ncdpo_rllib.rl import NOISE, DiffusionPolicyModule, NCDPOConfig, NonFiniteParametersError
from ncdpo_rllib.rl.learner import value_loss
from tests.conftest import learner_stats, runner_and_learner

MODULE = "default_policy"


class RecordingModule(DiffusionPolicyModule):
    """The real module; additionally keeps what its first train forward saw."""

    first_train_call = None

    def _forward_train(self, batch, **kwargs):
        out = super()._forward_train(batch, **kwargs)
        if RecordingModule.first_train_call is None:
            dist = self.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
            RecordingModule.first_train_call = {
                "noise_shape": tuple(batch[NOISE].shape),
                "obs_shape": tuple(batch[Columns.OBS].shape),
                "batch_size": batch[Columns.OBS].shape[0],
                "ratio": torch.exp(dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP]).detach(),
                "mask": batch[Columns.LOSS_MASK].clone(),
            }
        return out


def make_pair(module_class=DiffusionPolicyModule, env="Pendulum-v1", training=None, **diffusion):
    cfg = (
        NCDPOConfig()
        .environment(env)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .training(**{"train_batch_size_per_learner": 400, "minibatch_size": 100, "num_epochs": 2, **(training or {})})
        .diffusion(**diffusion)
        .debugging(seed=0)
    )
    return runner_and_learner(cfg, None if module_class is DiffusionPolicyModule else module_class)


def rollout_columns(ep):
    """(length, observations, stored noise, actions, stored log-probs) of one episode chunk."""
    n = len(ep)
    obs = torch.as_tensor(np.asarray(ep.get_observations(slice(0, n))), dtype=torch.float32)
    noise = torch.as_tensor(np.asarray(ep.get_extra_model_outputs(NOISE)))
    actions = torch.as_tensor(np.asarray(ep.get_actions()))
    logp = torch.as_tensor(np.asarray(ep.get_extra_model_outputs(Columns.ACTION_LOGP)))
    return n, obs, noise, actions, logp


@pytest.mark.parametrize("K", [1, 5])
def test_stored_noise_reaches_learner_and_first_ratio_is_one(K):
    RecordingModule.first_train_call = None
    cfg, runner, learner = make_pair(RecordingModule, denoising_steps=K)
    episodes = runner.sample(num_timesteps=400, random_actions=False)
    learner.update(episodes=episodes, num_epochs=1, minibatch_size=100, shuffle_batch_per_epoch=True)
    seen = RecordingModule.first_train_call
    assert seen["noise_shape"] == (seen["batch_size"], K + 1, 1)  # (B, K+1, action dims)
    ratio = seen["ratio"][seen["mask"]]
    assert ratio.numel() > 0 and (ratio - 1).abs().max() < 1e-4


@pytest.mark.slow
def test_a_compiled_chain_samples_and_updates_through_rllib():
    """``diffusion.compile`` on a real EnvRunner and Learner: the compiled update re-scores what
    the compiled rollout sampled (first ratio 1), and the per-step gradient norms still arrive."""
    RecordingModule.first_train_call = None
    _, runner, learner = make_pair(RecordingModule, denoising_steps=3, compile="default")
    episodes = runner.sample(num_timesteps=400, random_actions=False)
    results = learner.update(episodes=episodes, num_epochs=1, minibatch_size=100, shuffle_batch_per_epoch=True)
    for module in (runner.module, learner.module[MODULE]):
        sampler = module.unwrapped().actor.sampler
        assert sampler._compiled is not None and not sampler._compile_failed
    seen = RecordingModule.first_train_call
    ratio = seen["ratio"][seen["mask"]]
    assert ratio.numel() > 0 and (ratio - 1).abs().max() < 1e-4
    stats = learner_stats(results, MODULE)
    assert stats["grad_norm_step_first"] > 0 and stats["grad_norm_step_last"] > 0


def test_stored_logp_equals_gaussian_logp_recomputed_from_stored_noise():
    _, runner, _ = make_pair(denoising_steps=5, init_std=0.8)
    episodes = runner.sample(num_timesteps=200, random_actions=False)
    module = runner.module
    S = module.num_sampler_steps
    for ep in episodes:
        n, obs, noise, actions, logp = rollout_columns(ep)
        assert noise.shape == (n, S + 1, 1)
        with torch.no_grad():
            mean, log_std = module.actor(obs, noise)
        assert torch.allclose(actions, mean + log_std.exp() * noise[:, S], atol=1e-5)
        assert torch.allclose(logp, gaussian_log_prob(actions, mean, log_std), atol=1e-4)


def test_discrete_head_on_cartpole_stored_noise_logp_and_first_ratio():
    """Discrete action space -> logit diffusion: the stored noise is (S, n) per step, the
    stored log-prob is log_softmax(logits)[a] recomputed from it, and the learner's first
    minibatch sees ratio 1 with gradients at the first denoising step."""
    RecordingModule.first_train_call = None
    _, runner, learner = make_pair(RecordingModule, env="CartPole-v1", denoising_steps=4)
    episodes = runner.sample(num_timesteps=400, random_actions=False)
    module = runner.module
    for ep in episodes:
        n, obs, noise, actions, logp = rollout_columns(ep)
        assert noise.shape == (n, 4, 2) and not actions.is_floating_point()
        with torch.no_grad():
            logits = module.actor(module._cond({Columns.OBS: obs}), noise)
        assert torch.allclose(logp, torch.log_softmax(logits, -1)[torch.arange(n), actions.long()], atol=1e-5)
    results = learner.update(episodes=episodes, num_epochs=1, minibatch_size=100, shuffle_batch_per_epoch=True)
    seen = RecordingModule.first_train_call
    assert seen["noise_shape"] == (seen["batch_size"], 4, 2)
    ratio = seen["ratio"][seen["mask"]]
    assert ratio.numel() > 0 and (ratio - 1).abs().max() < 1e-4
    stats = learner_stats(results, MODULE)
    assert stats["grad_norm_step_first"] > 0 and "final_std" not in stats
    # Inference: the argmax of the logits (RLlib's deterministic categorical).
    out = module.forward_inference({Columns.OBS: obs})
    dist = module.get_inference_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    assert dist.to_deterministic().sample().shape == (n,)


def test_separate_actor_and_critic_optimizers():
    cfg, _, learner = make_pair()
    opts = dict(learner.get_optimizers_for_module(MODULE))
    assert set(opts) == {"actor", "critic"}
    assert opts["actor"].param_groups[0]["lr"] == pytest.approx(cfg.lr)
    assert opts["critic"].param_groups[0]["lr"] == pytest.approx(cfg.critic_lr)
    module = learner.module[MODULE]
    actor_ids = {id(p) for g in opts["actor"].param_groups for p in g["params"]}
    critic_ids = {id(p) for g in opts["critic"].param_groups for p in g["params"]}
    assert actor_ids == {id(p) for p in module.actor.parameters()}
    assert critic_ids == {id(p) for p in module.critic.parameters()}


def test_the_default_value_loss_gives_large_errors_a_gradient():
    """RLlib's vf_clip_param (10, on the squared error) zeroes the gradient of every error above 3.2:
    a fresh critic on returns of 20+ never learned. The default is no clip; a set clip still clips."""
    values = torch.zeros(3, requires_grad=True)
    targets = torch.tensor([1.0, 5.0, 30.0])
    value_loss(values, targets, NCDPOConfig().vf_clip_param).sum().backward()
    torch.testing.assert_close(values.grad, -2 * targets)
    values.grad = None
    value_loss(values, targets, 10.0).sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([-2.0, 0.0, 0.0]))


def test_update_logs_diagnostics_and_per_step_gradient_norms():
    _, runner, learner = make_pair(denoising_steps=5)
    results = learner.update(episodes=runner.sample(num_timesteps=400), num_epochs=2, minibatch_size=100)
    stats = learner_stats(results, MODULE)
    for key in ("ratio_mean", "ratio_max", "clip_fraction", "approx_kl", "final_std", "vf_explained_var",
                "grad_norm_actor", "grad_norm_critic", "grad_norm_step_first", "grad_norm_step_mid",
                "grad_norm_step_last"):
        assert key in stats and np.isfinite(stats[key]), key
    assert stats["grad_norm_step_first"] > 0 and stats["grad_norm_step_last"] > 0
    assert stats["final_std"] == pytest.approx(1.0, abs=0.05)  # explores like RLlib's MLP PPO


def test_target_kl_stops_the_epochs_early():
    cfg, runner, learner = make_pair()
    cfg_kl = cfg.copy(copy_frozen=False).training(target_kl=1e-9, lr=1e-2)
    learner_kl = cfg_kl.build_learner(env=runner.env)
    learner_kl.module[MODULE].set_state(learner.module[MODULE].get_state())
    episodes = runner.sample(num_timesteps=400)
    results = learner_kl.update(episodes=episodes, num_epochs=4, minibatch_size=100)
    adam = learner_kl.get_optimizer(MODULE, "actor")
    steps = {int(s["step"]) for s in adam.state.values()}
    assert steps == {1}, f"actor optimizer stepped {steps} times, expected 1 then stop"
    assert results[MODULE]["kl_stop_fraction"].peek() > 0.5


def test_non_finite_parameters_raise_a_clear_error():
    _, runner, learner = make_pair()
    with torch.no_grad():
        learner.module[MODULE].critic[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteParametersError, match="NaN/inf"):
        learner.update(episodes=runner.sample(num_timesteps=400), num_epochs=1, minibatch_size=100)


class FirstPassNaNModule(DiffusionPolicyModule):
    """The real module, whose first train forward yields NaN (a fault injected once)."""

    calls = 0

    def _forward_train(self, batch, **kwargs):
        out = super()._forward_train(batch, **kwargs)
        FirstPassNaNModule.calls += 1
        if FirstPassNaNModule.calls == 1:
            out[Columns.ACTION_DIST_INPUTS] = out[Columns.ACTION_DIST_INPUTS] * float("nan")
        return out


def test_a_nan_minibatch_is_skipped_and_training_goes_on():
    FirstPassNaNModule.calls = 0
    _, runner, learner = make_pair(FirstPassNaNModule)
    before = [p.detach().clone() for p in learner.module[MODULE].actor.parameters()]
    results = learner.update(episodes=runner.sample(num_timesteps=400), num_epochs=1, minibatch_size=200)
    assert FirstPassNaNModule.calls >= 2
    assert results[MODULE]["nonfinite_updates_skipped"].peek() == 1
    adam = learner.get_optimizer(MODULE, "actor")
    assert {int(st["step"]) for st in adam.state.values()} == {FirstPassNaNModule.calls - 1}
    after = list(learner.module[MODULE].actor.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_each_optimizer_clips_with_its_own_norm():
    cfg, _, learner = make_pair()
    cfg = cfg.copy(copy_frozen=False).training(actor_grad_clip=0.1, critic_grad_clip=5.0)
    learner.config = cfg
    learner.before_gradient_based_update(timesteps={})
    module = learner.module[MODULE]
    grads = {learner.get_param_ref(p): torch.full_like(p, 10.0) for p in module.parameters()}
    out = learner.postprocess_gradients_for_module(
        module_id=MODULE, config=cfg, module_gradients_dict=grads)
    norm = lambda ps: torch.sqrt(sum((out[learner.get_param_ref(p)] ** 2).sum() for p in ps))
    assert norm(module.actor_parameters()) == pytest.approx(0.1, rel=1e-3)
    assert norm(module.critic_parameters()) == pytest.approx(5.0, rel=1e-3)


def test_masked_rows_do_not_change_the_loss():
    _, runner, learner = make_pair(denoising_steps=3)
    module = learner.module[MODULE]
    B, S = 64, module.num_sampler_steps
    torch.manual_seed(0)
    batch = {
        Columns.OBS: torch.randn(B, 3),
        NOISE: torch.randn(B, S + 1, 1),
        Columns.ACTIONS: torch.randn(B, 1),
        Columns.ACTION_LOGP: torch.randn(B) - 1.0,
        "advantages": torch.randn(B),
        "value_targets": torch.randn(B),
        Columns.LOSS_MASK: torch.arange(B) % 4 != 0,
    }
    learner.before_gradient_based_update(timesteps={})

    def loss(b):
        return learner.compute_loss_for_module(
            module_id=MODULE, config=learner.config, batch=b, fwd_out=module.forward_train(b)).item()

    reference = loss(batch)
    poisoned = dict(batch)
    masked = ~batch[Columns.LOSS_MASK]
    poisoned["advantages"] = batch["advantages"].masked_fill(masked, 1e6)
    poisoned["value_targets"] = batch["value_targets"].masked_fill(masked, -1e6)
    assert loss(poisoned) == pytest.approx(reference, rel=1e-6)


def test_observations_reach_the_module_normalised():
    _, runner, _ = make_pair()
    episodes = runner.sample(num_timesteps=2000)
    stats = runner.get_state()["env_to_module_connector"]["MeanStdFilter"][None]["running_stats"][0]
    assert stats["num_pushes"] >= 2000  # the filter's state travels with the EnvRunner's state
    obs = np.concatenate([np.asarray(ep.get_observations()) for ep in episodes])
    assert np.abs(obs.mean(0)).max() < 0.3 and np.abs(obs.std(0) - 1).max() < 0.3


def test_kl_to_reference_and_critic_warmup():
    cfg, runner, _ = make_pair()
    cfg_kl = cfg.copy(copy_frozen=False).training(kl_to_reference=1.0, lr=1e-2)
    learner = cfg_kl.build_learner(env=runner.env)
    module = learner.module[MODULE]
    ref0 = {k: v.clone() for k, v in module.reference.state_dict().items()}
    for k, v in module.actor.state_dict().items():
        torch.testing.assert_close(v, ref0[k])  # the reference starts as the initial actor
    assert not any(p.requires_grad for p in module.reference.parameters())
    assert {id(p) for p in module.actor_parameters()}.isdisjoint({id(p) for p in module.reference.parameters()})
    results = learner.update(episodes=runner.sample(num_timesteps=400), num_epochs=2, minibatch_size=100)
    assert results[MODULE]["kl_to_reference"].peek() > 0  # the actor moved away, the term saw it
    for k, v in module.reference.state_dict().items():
        torch.testing.assert_close(v, ref0[k])  # ...and the reference did not move
    # A state without reference.* (a pre-trained or older checkpoint) fills it from the actor.
    state = {k: v for k, v in module.get_state().items() if not k.startswith("reference.")}
    module.set_state(state)
    for k, v in module.actor.state_dict().items():
        torch.testing.assert_close(module.reference.state_dict()[k], v)

    # Critic warm-up: the actor's optimizer never steps, the critic's does.
    cfg_w = cfg.copy(copy_frozen=False).training(critic_warmup_iters=1)
    learner_w = cfg_w.build_learner(env=runner.env)
    actor0 = [p.detach().clone() for p in learner_w.module[MODULE].actor_parameters()]
    critic0 = [p.detach().clone() for p in learner_w.module[MODULE].critic_parameters()]
    results = learner_w.update(episodes=runner.sample(num_timesteps=400), num_epochs=1, minibatch_size=100)
    assert results[MODULE]["actor_frozen"].peek() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(actor0, learner_w.module[MODULE].actor_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(critic0, learner_w.module[MODULE].critic_parameters()))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_logp_reduction_mean_divides_the_log_ratio_by_the_action_dims(reduction):
    """``logp_reduction: mean`` is the summed log-ratio / (chunk x action dims); the first
    minibatch's ratio is 1 either way (one minibatch of the whole batch: no step before it)."""
    _, runner, learner = make_pair(env="Hopper-v5", training=dict(logp_reduction=reduction), denoising_steps=3)
    module = learner.module[MODULE]
    D = module.actor.action_dim
    torch.manual_seed(0)
    B = 16
    obs = torch.randn(B, module.observation_space.shape[0])
    out = module.forward_exploration({Columns.OBS: obs})
    old_inputs = out[Columns.ACTION_DIST_INPUTS] + 0.05 * torch.randn_like(out[Columns.ACTION_DIST_INPUTS])
    old_mean, old_log_std = old_inputs.chunk(2, dim=-1)
    batch = {Columns.OBS: obs, NOISE: out[NOISE], Columns.ACTIONS: out[Columns.ACTIONS],
             Columns.ACTION_DIST_INPUTS: old_inputs,
             Columns.ACTION_LOGP: gaussian_log_prob(out[Columns.ACTIONS], old_mean, old_log_std)}
    with torch.no_grad():
        fwd = module.forward_train(batch)
        dist = module.get_train_action_dist_cls().from_logits(fwd[Columns.ACTION_DIST_INPUTS])
        log_ratio = learner._final_log_ratio(module, learner.config, batch, fwd, dist)
    summed = gaussian_log_prob(out[Columns.ACTIONS], *fwd[Columns.ACTION_DIST_INPUTS].chunk(2, -1)) - batch[Columns.ACTION_LOGP]
    expected = summed / D if reduction == "mean" else summed
    assert D == 3 and summed.abs().min() > 1e-3
    assert torch.allclose(log_ratio, expected, atol=1e-5)

    results = learner.update(episodes=runner.sample(num_timesteps=400, random_actions=False),
                             num_epochs=1, minibatch_size=10_000)
    stats = learner_stats(results, MODULE)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and abs(stats["approx_kl"]) < 1e-8


def test_logp_clamp_bounds_each_elements_log_prob():
    _, _, learner = make_pair(env="Hopper-v5", training=dict(logp_reduction="mean", logp_clamp=(-5.0, 2.0)),
                              denoising_steps=2)
    module = learner.module[MODULE]
    obs = torch.randn(4, module.observation_space.shape[0])
    out = module.forward_exploration({Columns.OBS: obs})
    far = out[Columns.ACTIONS] + 10.0  # every element's log-prob far below -5 under both Gaussians
    batch = {Columns.OBS: obs, NOISE: out[NOISE], Columns.ACTIONS: far,
             Columns.ACTION_DIST_INPUTS: out[Columns.ACTION_DIST_INPUTS] + 0.1, Columns.ACTION_LOGP: torch.zeros(4)}
    with torch.no_grad():
        fwd = module.forward_train(batch)
        dist = module.get_train_action_dist_cls().from_logits(fwd[Columns.ACTION_DIST_INPUTS])
        assert torch.equal(learner._final_log_ratio(module, learner.config, batch, fwd, dist), torch.zeros(4))


def test_running_reward_scaling_divides_by_the_running_return_std():
    from ray.rllib.connectors.learner import GeneralAdvantageEstimation

    from ncdpo_rllib.rl.reward_scaling import RunningRewardScaling

    cfg, runner, learner = make_pair(training=dict(reward_scale_running=True, gamma=0.9), denoising_steps=2)
    names = [type(c).__name__ for c in learner._learner_connector.connectors]
    assert names.index("RunningRewardScaling") == names.index(GeneralAdvantageEstimation.__name__) - 1
    episodes = runner.sample(num_timesteps=200, random_actions=False)
    rewards = [np.asarray(e.get_rewards(), dtype=np.float64) for e in episodes]
    piece = RunningRewardScaling(gamma=0.9)
    batch = {MODULE: {Columns.REWARDS: torch.as_tensor(np.concatenate(rewards), dtype=torch.float32)}}
    scaled = piece(rl_module=None, episodes=episodes, batch=batch)[MODULE][Columns.REWARDS].numpy()
    returns = []  # by hand: discounted returns from each chunk's start, last row left out
    for r in rewards:
        ret = np.zeros(len(r))
        for t in range(len(r)):
            ret[t] = 0.9 * (ret[t - 1] if t else 0.0) + r[t]
        returns.append(ret[:-1])
    x = np.concatenate(returns)
    n, c = x.size, 1e-4  # RunningStat starts at mean 0, var 1, count 1e-4
    var = (1.0 * c + x.var() * n + x.mean() ** 2 * c * n / (c + n)) / (c + n)
    expected = np.clip(np.concatenate(rewards) / np.sqrt(var + 1e-8), -10, 10)
    assert np.allclose(scaled, expected, rtol=1e-5) and np.abs(scaled).max() < np.abs(np.concatenate(rewards)).max()
    results = learner.update(episodes=runner.sample(num_timesteps=400, random_actions=False),
                             num_epochs=1, minibatch_size=100)
    assert np.isfinite(results[MODULE]["vf_loss"].peek())
