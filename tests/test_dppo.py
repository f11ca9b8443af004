"""DPPO baseline: per-step likelihoods against closed forms, and its RLlib links.

Real torch; real ``SingleAgentEnvRunner`` and ``DPPOTorchLearner`` built in-process on
Pendulum-v1 (as ``test_rllib_links.py`` does); tiny networks.
"""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from ray.rllib.core.columns import Columns

from ncdpo_rllib.diffusion import DiffusionConfig, NoiseConditionedSampler
from ncdpo_rllib.diffusion.denoiser import DenoiserMLP
from ncdpo_rllib.rl.dppo import DPPO_CHAIN, DPPO_STEP_LOGP, DPPO, DPPOConfig, DPPOModule, DPPOTorchLearner
from ncdpo_rllib.rl.dppo import clip_schedule as dppo_clip_schedule
from tests.conftest import learner_stats, runner_and_learner

MODULE = "default_policy"
OBS_DIM, ACT_DIM = 3, 2


def make_module(**diffusion) -> DPPOModule:
    """A standalone DPPOModule with a non-trivial denoiser output (every step matters)."""
    torch.manual_seed(0)
    spec = DPPOConfig().diffusion(hidden=[32, 32], critic_hidden=[16], **diffusion).get_default_rl_module_spec()
    spec.observation_space = gym.spaces.Box(-1, 1, (OBS_DIM,))
    spec.action_space = gym.spaces.Box(-1, 1, (ACT_DIM,))
    module = spec.build()
    nn.init.normal_(module.actor.sampler.denoiser.out.weight, std=0.3)
    return module


def hand_step_log_probs(module: DPPOModule, obs: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """(B, S, D) per-element log-probs written out: mu_k from the denoiser and DDPM/DDIM coefficients
    computed here in float64 from the linear betas, sigma floored, Gaussian by hand."""
    cfg, net = module.diffusion_config, module.actor.sampler.denoiser
    betas = torch.linspace(cfg.beta_min, cfg.beta_max, cfg.denoising_steps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    ab = lambda k: abar[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
    steps = module.actor.sampler.timesteps
    B, S = chain.shape[0], len(steps)
    out = []
    for i, k in enumerate(steps):
        k_prev = steps[i + 1] if i + 1 < S else 0
        x = chain[:, i].double()
        pred = net(chain[:, i], torch.full((B,), k), module._cond({Columns.OBS: obs})).double()
        x0 = pred if cfg.prediction == "x0" else (x - torch.sqrt(1 - ab(k)) * pred) / torch.sqrt(ab(k))
        if cfg.x0_clip is not None:  # the soft clip (the default mode)
            x0 = cfg.x0_clip * torch.tanh(x0 / cfg.x0_clip)
        eps = (x - torch.sqrt(ab(k)) * x0) / torch.sqrt(1 - ab(k))
        if k_prev == 0:  # the final Gaussian: the policy's std, floored
            mu, sigma = x0, module.actor.log_std.double().exp().clamp(min=cfg.sigma_min)
        elif cfg.sampler == "ddpm":
            c_x0 = betas[k - 1] * torch.sqrt(ab(k - 1)) / (1 - ab(k))
            c_xk = (1 - ab(k - 1)) * torch.sqrt(1 - betas[k - 1]) / (1 - ab(k))
            mu = c_x0 * x0 + c_xk * x
            sigma = max(math.sqrt(betas[k - 1] * (1 - ab(k - 1)) / (1 - ab(k))), cfg.sigma_min)
        else:
            s = cfg.ddim_eta * math.sqrt((1 - ab(k_prev)) / (1 - ab(k)) * (1 - ab(k) / ab(k_prev)))
            mu = torch.sqrt(ab(k_prev)) * x0 + math.sqrt(max(1 - ab(k_prev) - s**2, 0)) * eps
            sigma = max(s, cfg.sigma_min)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        z = (chain[:, i + 1].double() - mu) / sigma
        out.append(-0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi))
    return torch.stack(out, dim=1)


CHAIN_CASES = [
    dict(denoising_steps=4),
    dict(denoising_steps=4, prediction="epsilon", x0_clip=1.0, init_std=0.05),  # final std floored
    dict(denoising_steps=6, sampler="ddim", ddim_steps=3, ddim_eta=0.5),
    dict(denoising_steps=3, sampler="ddim", prediction="epsilon", ddim_eta=1.0),
]


@pytest.mark.parametrize("diffusion", CHAIN_CASES)
def test_step_means_and_stds_match_the_sequential_sampler(diffusion):
    """The batched method reproduces ``_step`` on the chain the sampler itself produced."""
    cfg = DiffusionConfig(**diffusion)
    torch.manual_seed(1)
    net = DenoiserMLP(ACT_DIM, OBS_DIM, [16])
    nn.init.normal_(net.out.weight, std=0.3)
    sampler = NoiseConditionedSampler(cfg, net)
    S = sampler.num_steps
    cond, noise = torch.randn(5, OBS_DIM), torch.randn(5, S + 1, ACT_DIM)
    chain = sampler(cond, noise, keep_chain=True)
    states = torch.stack(chain.states, dim=1)
    terms = net.prepare(sampler.step_k, cond)
    ref = [sampler._step(states[:, i], i, net, terms) for i in range(S)]
    assert torch.allclose(sampler.step_means(cond, states), torch.stack([m for _, m, _ in ref], 1), atol=1e-6)
    assert torch.allclose(sampler.step_means(cond, states, first=S - 1)[:, 0], chain.mean, atol=1e-6)
    assert torch.allclose(sampler.transition_stds(), torch.stack([s for _, _, s in ref[:-1]]).reshape(S - 1))


@pytest.mark.parametrize("diffusion", CHAIN_CASES)
def test_train_step_log_probs_equal_the_closed_form(diffusion):
    module = make_module(**diffusion)
    obs = torch.randn(6, OBS_DIM)
    explore = module.forward_exploration({Columns.OBS: obs})
    chain, old = explore[DPPO_CHAIN], explore[DPPO_STEP_LOGP]
    S = module.num_sampler_steps
    assert chain.shape == (6, S + 1, ACT_DIM) and old.shape == (6, S, ACT_DIM)
    new = module.forward_train({Columns.OBS: obs, DPPO_CHAIN: chain})[DPPO_STEP_LOGP]
    assert new.requires_grad
    with torch.no_grad():
        hand = hand_step_log_probs(module, obs, chain).float()
    assert torch.allclose(new, hand, atol=1e-4)
    assert torch.allclose(old, hand, atol=1e-4)  # what exploration stored: the same transitions
    assert torch.allclose(explore[Columns.ACTION_LOGP], old.sum((-1, -2)))
    assert torch.equal(explore[Columns.ACTIONS], chain[:, -1])


def make_pair(module_class=DPPOModule, gamma_denoise=0.99, env="Pendulum-v1", training=None, **diffusion):
    cfg = (
        DPPOConfig()
        .environment(env)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .training(**{"train_batch_size_per_learner": 400, "minibatch_size": 100, "num_epochs": 1,
                     "gamma_denoise": gamma_denoise, **(training or {})})
        .diffusion(hidden=[32, 32], critic_hidden=[32], **diffusion)
        .debugging(seed=0)
    )
    return runner_and_learner(cfg, None if module_class is DPPOModule else module_class)


class RecordingModule(DPPOModule):
    """The real module; additionally keeps what its first train forward saw."""

    first_train_call = None

    def _forward_train(self, batch, **kwargs):
        out = super()._forward_train(batch, **kwargs)
        if RecordingModule.first_train_call is None:
            RecordingModule.first_train_call = {
                "chain": tuple(batch[DPPO_CHAIN].shape),
                "step_logp": tuple(batch[DPPO_STEP_LOGP].shape),
                "batch_size": batch[Columns.OBS].shape[0],
                "ratio": torch.exp((out[DPPO_STEP_LOGP] - batch[DPPO_STEP_LOGP]).sum(-1)).detach(),
                "mask": batch[Columns.LOSS_MASK].clone(),
            }
        return out


@pytest.mark.parametrize(
    "diffusion", [dict(denoising_steps=4), dict(denoising_steps=6, sampler="ddim", ddim_steps=3)]
)
def test_columns_reach_the_learner_and_the_first_ratio_is_one(diffusion):
    RecordingModule.first_train_call = None
    _, runner, learner = make_pair(RecordingModule, **diffusion)
    episodes = runner.sample(num_timesteps=400, random_actions=False)
    results = learner.update(episodes=episodes, num_epochs=1, minibatch_size=100, shuffle_batch_per_epoch=True)
    seen, S = RecordingModule.first_train_call, learner.module[MODULE].num_sampler_steps
    assert seen["chain"] == (seen["batch_size"], S + 1, 1)  # Pendulum: 1 action dim
    assert seen["step_logp"] == (seen["batch_size"], S, 1)
    ratio = seen["ratio"][seen["mask"]]
    assert ratio.numel() == seen["mask"].sum() * S and (ratio - 1).abs().max() < 1e-5
    stats = learner_stats(results, MODULE)
    for key in ("ratio_mean", "ratio_max", "clip_fraction", "approx_kl", "final_std", "vf_explained_var",
                "policy_loss", "vf_loss", "entropy", "grad_norm_actor", "grad_norm_critic"):
        assert key in stats and np.isfinite(stats[key]), key


def synthetic_batch(module: DPPOModule, B: int = 32) -> dict:
    torch.manual_seed(0)
    obs = torch.randn(B, module.observation_space.shape[0])
    out = module.forward_exploration({Columns.OBS: obs})
    return {
        Columns.OBS: obs,
        DPPO_CHAIN: out[DPPO_CHAIN],
        DPPO_STEP_LOGP: out[DPPO_STEP_LOGP] + 0.3 * torch.randn_like(out[DPPO_STEP_LOGP]),  # ratios != 1
        Columns.ACTIONS: out[Columns.ACTIONS],
        Columns.ACTION_LOGP: out[Columns.ACTION_LOGP],
        "advantages": torch.randn(B),
        "value_targets": torch.randn(B),
        Columns.LOSS_MASK: torch.arange(B) % 4 != 0,
    }


def test_only_the_last_finetune_steps_enter_the_loss():
    S, K_ft = 5, 2
    first = S - K_ft
    _, _, learner = make_pair(denoising_steps=S, finetune_steps=K_ft)
    module = learner.module[MODULE]
    batch = synthetic_batch(module)
    learner.before_gradient_based_update(timesteps={})
    seen_k = []
    denoiser = module.actor.sampler.denoiser
    hook = denoiser.step_embed.register_forward_pre_hook(lambda m, args: seen_k.append(set(args[0].tolist())))

    def loss(b):
        fwd = module.forward_train(b)
        assert fwd[DPPO_STEP_LOGP].shape == (32, K_ft, 1)
        return learner.compute_loss_for_module(module_id=MODULE, config=learner.config, batch=b, fwd_out=fwd)

    chain = batch[DPPO_CHAIN].clone().requires_grad_(True)
    reference = loss({**batch, DPPO_CHAIN: chain})
    reference.backward()
    hook.remove()
    assert seen_k == [set(module.actor.sampler.timesteps[first:])]  # one call, last K_ft steps only
    assert chain.grad[:, :first].abs().max() == 0 and chain.grad[:, first:].abs().sum() > 0
    with torch.no_grad():
        early = batch[DPPO_CHAIN].clone()
        early[:, :first] += 1.0
        early_logp = batch[DPPO_STEP_LOGP].clone()
        early_logp[:, :first] -= 5.0
        assert loss({**batch, DPPO_CHAIN: early, DPPO_STEP_LOGP: early_logp}) == reference
        late = batch[DPPO_STEP_LOGP].clone()
        late[:, first] -= 0.1
        assert loss({**batch, DPPO_STEP_LOGP: late}) != reference


def test_policy_loss_is_the_discounted_clipped_surrogate_over_steps_and_masked():
    gamma_denoise, S = 0.5, 3
    cfg, _, learner = make_pair(gamma_denoise=gamma_denoise, denoising_steps=S)
    cfg = cfg.copy(copy_frozen=False).training(vf_loss_coeff=0.0, entropy_coeff=0.0)
    module = learner.module[MODULE]
    batch = synthetic_batch(module)
    learner.before_gradient_based_update(timesteps={})
    with torch.no_grad():
        fwd = module.forward_train(batch)
        total = learner.compute_loss_for_module(module_id=MODULE, config=cfg, batch=batch, fwd_out=fwd)
        ratio = torch.exp((fwd[DPPO_STEP_LOGP] - batch[DPPO_STEP_LOGP]).sum(-1))
        adv = batch["advantages"][:, None] * torch.tensor([gamma_denoise**2, gamma_denoise, 1.0])
        surr = torch.min(adv * ratio, adv * ratio.clamp(1 - cfg.clip_param, 1 + cfg.clip_param))
        assert total.item() == pytest.approx(-surr[batch[Columns.LOSS_MASK]].mean().item(), rel=1e-5)
        poisoned = {**batch, "advantages": batch["advantages"].masked_fill(~batch[Columns.LOSS_MASK], 1e6)}
        again = learner.compute_loss_for_module(module_id=MODULE, config=cfg, batch=poisoned, fwd_out=fwd)
        assert again.item() == pytest.approx(total.item(), rel=1e-6)


def test_config_wires_dppo_and_validates_gamma_denoise():
    cfg = DPPOConfig().environment("Pendulum-v1").training(gamma_denoise=0.9)
    assert cfg.gamma_denoise == 0.9 and cfg.algo_class is DPPO
    assert cfg.get_default_rl_module_spec().module_class is DPPOModule
    assert cfg.get_default_learner_class() is DPPOTorchLearner
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="gamma_denoise"):
            DPPOConfig().environment("Pendulum-v1").training(gamma_denoise=bad).validate()
    with pytest.raises(ValueError, match="kl_to_reference"):  # NCDPO's regulariser: no DPPO counterpart
        DPPOConfig().environment("Pendulum-v1").training(kl_to_reference=0.1).validate()
    with pytest.raises(ValueError, match="clip_param_base"):
        DPPOConfig().environment("Pendulum-v1").training(clip_param=0.01, clip_param_base=0.1).validate()
    with pytest.raises(ValueError, match="sigma_min"):
        DPPOConfig().environment("Pendulum-v1").diffusion(sigma_min=0.0).validate()


def test_two_training_iterations_report_finite_metrics():
    algo = (
        DPPOConfig()
        .environment("Pendulum-v1")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .training(train_batch_size_per_learner=200, minibatch_size=100, num_epochs=1, gamma_denoise=0.9)
        .diffusion(denoising_steps=3, finetune_steps=2, hidden=[32], critic_hidden=[32])
        .debugging(seed=0, log_level="ERROR")
        .build_algo()
    )
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    learner = results[-1]["learners"][MODULE]
    assert results[-1]["env_runners"]["num_env_steps_sampled_lifetime"] >= 400
    for key in ("ratio_mean", "approx_kl", "clip_fraction", "policy_loss", "vf_loss", "final_std", "entropy"):
        assert np.isfinite(learner[key]), key


def test_loss_equals_the_reference_formula():
    """DPPO's reference loss written out independently (numpy quantiles, a loop over the
    fine-tuned steps): per-element log-probs clamped to [-5, 2] and averaged over the action
    dims, advantages standardised per minibatch and clipped to their 5th..95th percentiles,
    then discounted by gamma_denoise^(S_ft-1-i), and the clip annealed from the base at the
    earliest fine-tuned step to clip_param at the last."""
    S, S_ft, g, clip, base, rate = 5, 3, 0.9, 0.1, 0.02, 3.0
    dppo = dict(logp_reduction="mean", logp_clamp=(-5.0, 2.0), advantage_normalization="minibatch",
                advantage_clip_quantiles=(0.05, 0.95), clip_param=clip, clip_param_base=base,
                clip_param_rate=rate, vf_loss_coeff=0.0, entropy_coeff=0.0)
    cfg, _, learner = make_pair(env="Hopper-v5", gamma_denoise=g, training=dppo, denoising_steps=S, finetune_steps=S_ft)
    module = learner.module[MODULE]
    batch = synthetic_batch(module, B=48)
    old = batch[DPPO_STEP_LOGP].clone()
    old[::5, -1, 0] = -8.0  # below the clamp
    batch[DPPO_STEP_LOGP] = old
    batch["advantages"] = batch["advantages"] * 3 + 1  # not standardised yet
    learner.before_gradient_based_update(timesteps={})
    with torch.no_grad():
        fwd = module.forward_train(batch)
        total = learner.compute_loss_for_module(module_id=MODULE, config=learner.config, batch=batch, fwd_out=fwd)

        m = batch[Columns.LOSS_MASK].numpy()
        new = fwd[DPPO_STEP_LOGP].double().numpy()[m]  # (n, S_ft, D)
        ref_old = old[:, S - S_ft :].double().numpy()[m]
        new_l = np.clip(new, -5, 2).mean(-1)
        old_l = np.clip(ref_old, -5, 2).mean(-1)
        adv = batch["advantages"].double().numpy()[m]
        adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-8)
        adv = np.clip(adv, np.quantile(adv, 0.05), np.quantile(adv, 0.95))
        losses = []
        for i in range(S_ft):
            a = adv * g ** (S_ft - i - 1)
            c = base + (clip - base) * (math.exp(rate * i / (S_ft - 1)) - 1) / (math.exp(rate) - 1)
            r = np.exp(new_l[:, i] - old_l[:, i])
            losses.append(np.maximum(-a * r, -a * np.clip(r, 1 - c, 1 + c)))
        expected = np.stack(losses, 1).mean()
    assert total.item() == pytest.approx(expected, rel=1e-4)
    # Every part of the formula matters on this batch.
    for change in (dict(logp_clamp=None), dict(logp_reduction="sum"), dict(advantage_clip_quantiles=None),
                   dict(advantage_normalization="batch"), dict(clip_param_base=None)):
        other = learner.config.copy(copy_frozen=False).training(**change)
        with torch.no_grad():
            again = learner.compute_loss_for_module(module_id=MODULE, config=other, batch=batch, fwd_out=fwd)
        assert again.item() != pytest.approx(total.item(), rel=1e-4), change


def test_clip_schedule_runs_from_the_base_to_the_full_clip():
    cfg = DPPOConfig().training(clip_param=0.01, clip_param_base=0.001, clip_param_rate=3.0)
    clips = dppo_clip_schedule(cfg, 10)
    assert clips[0].item() == pytest.approx(0.001) and clips[-1].item() == pytest.approx(0.01)
    assert bool((clips.diff() > 0).all())
    assert torch.equal(dppo_clip_schedule(DPPOConfig().training(clip_param=0.05), 4), torch.full((4,), 0.05))
    assert dppo_clip_schedule(cfg, 1).tolist() == [pytest.approx(0.01)]  # one step: the full clip


def test_frozen_base_runs_the_early_steps_and_never_changes():
    S, S_ft = 4, 2
    _, runner, learner = make_pair(denoising_steps=S, finetune_steps=S_ft, frozen_base=True,
                                   training=dict(num_epochs=3, lr=1e-2))
    module = learner.module[MODULE]
    sampler = module.actor.sampler
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert not any(p.requires_grad for p in sampler.base_denoiser.parameters())
    assert all(p is not q for p in module.actor_parameters() for q in sampler.base_denoiser.parameters())
    learner.update(episodes=runner.sample(num_timesteps=400, random_actions=False), num_epochs=3, minibatch_size=100)
    after = module.state_dict()
    changed = lambda prefix: any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix))
    assert not changed("actor.sampler.base_denoiser.") and changed("actor.sampler.denoiser.")

    # The early steps of a rollout run the base, the fine-tuned ones the updated denoiser.
    torch.manual_seed(0)
    cond, noise = torch.randn(8, 3), torch.randn(8, S + 1, 1)
    with torch.no_grad():
        states = module.actor.chain(cond, noise).states
        x = states[0]
        base, fine_tuned = sampler.base_denoiser, sampler.denoiser
        for i in range(S - S_ft):
            _, mean, std = sampler._step(x, i, base, base.prepare(sampler.step_k, cond))
            x = mean + std * noise[:, i + 1]
            assert torch.allclose(states[i + 1], x, atol=1e-6)
            _, fine, _ = sampler._step(states[i], i, fine_tuned, fine_tuned.prepare(sampler.step_k, cond))
            assert not torch.allclose(mean, fine, atol=1e-4)  # the updated weights would differ

    # A state without the base (a pre-trained module) fills it with that state's denoiser.
    state = {k: v.clone() for k, v in before.items() if "base_denoiser" not in k}
    state["actor.sampler.denoiser.out.weight"] += 1.0
    module.set_state(state)
    assert torch.equal(sampler.base_denoiser.out.weight, sampler.denoiser.out.weight)


def test_a_fixed_std_module_starts_from_a_learned_std_pretrained_state():
    """The DPPO recipe's std: fixed fine-tunes a policy pre-trained with a learned std: the chain's
    weights load, the final std is the recipe's own."""
    learned = make_module(denoising_steps=3, std="learned", init_std=1.0)
    fixed = make_module(denoising_steps=3, std="fixed", init_std=0.1, finetune_steps=2, frozen_base=True)
    nn.init.normal_(learned.actor.sampler.denoiser.out.weight, std=1.0)
    fixed.load_pretrained(learned.get_state())
    assert torch.equal(fixed.actor.sampler.denoiser.out.weight, learned.actor.sampler.denoiser.out.weight)
    assert torch.equal(fixed.actor.sampler.base_denoiser.out.weight, learned.actor.sampler.denoiser.out.weight)
    assert torch.allclose(fixed.actor.log_std.exp(), torch.full((ACT_DIM,), 0.1))
    assert not fixed.actor.log_std.requires_grad
