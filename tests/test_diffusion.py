"""The diffusion core against closed forms: pure torch, milliseconds, no RLlib."""

import copy
import math

import pytest
import torch
from torch import nn

from ncdpo_rllib.diffusion import (
    DiffusionConfig,
    DiffusionPolicy,
    DiscreteDiffusionPolicy,
    NoiseConditionedSampler,
    NoiseSchedule,
    StepGradNorms,
    categorical_log_prob,
    gaussian_log_prob,
)
from ncdpo_rllib.diffusion.denoiser import Denoiser, DenoiserMLP

D, C = 3, 4


def make_policy(**kw) -> DiffusionPolicy:
    torch.manual_seed(0)
    policy = DiffusionPolicy(DiffusionConfig(**kw), action_dim=D, cond_dim=C)
    # Make the output layer non-trivial so that every step matters numerically.
    nn.init.normal_(policy.sampler.denoiser.out.weight, std=0.3)
    return policy


class ConstantDenoiser(Denoiser):
    """f(x, k, c) = value for every input: lets the chain be written out by hand."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, k, cond):
        return torch.full_like(x, self.value)


class PerStepDenoiser(Denoiser):
    """One independent copy of a denoiser per schedule step: its k-th copy's gradient is
    exactly the contribution of denoising step k to the shared parameters' gradient."""

    def __init__(self, base: nn.Module, num_steps: int):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(base) for _ in range(num_steps))

    def forward(self, x, k, cond):
        return self.copies[int(k[0]) - 1](x, k, cond)


def test_schedules():
    lin = NoiseSchedule.make("linear", 5, 1e-4, 0.2)
    assert torch.allclose(lin.betas[[0, -1]], torch.tensor([1e-4, 0.2], dtype=torch.float64))
    assert lin.posterior_variance[0] == 0  # abar_0 = 1: the last step is the mean
    c_x0, c_xk = lin.posterior_mean_coefs
    assert c_x0[0] == pytest.approx(1.0) and c_xk[0] == pytest.approx(0.0)
    cos = NoiseSchedule.make("cosine", 20, 1e-4, 0.2, cosine_beta_clip=0.5)
    assert (cos.abar[1:] < cos.abar[:-1]).all() and cos.betas.max() == pytest.approx(0.5)
    assert cos.betas[0] < 0.01  # beta_max (a linear-schedule knob) does not clamp the cosine betas
    with pytest.raises(ValueError):
        NoiseSchedule.make("quadratic", 5, 1e-4, 0.2)


def test_sampler_is_deterministic_given_noise():
    policy = make_policy(denoising_steps=5)
    cond, noise = torch.randn(8, C), policy.sample_noise(8)
    m1, _ = policy(cond, noise)
    m2, _ = policy(cond, noise)
    assert torch.equal(m1, m2)
    m3, _ = policy(cond, policy.sample_noise(8))
    assert not torch.allclose(m1, m3)


@pytest.mark.parametrize("prediction", ["x0", "epsilon"])
def test_final_mean_matches_step_by_step_computation(prediction):
    K = 4
    policy = make_policy(denoising_steps=K, prediction=prediction, sigma_min=0.05, noise_clip=None)
    net = policy.sampler.denoiser
    cond, noise = torch.randn(5, C), torch.randn(5, K + 1, D)
    betas = NoiseSchedule.make("linear", K, 1e-4, 0.2).betas.float()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    x = noise[:, 0]
    for i, k in enumerate(range(K, 0, -1)):
        out = net(x, torch.full((5,), k), cond)
        ab = abar[k - 1]
        x0 = out if prediction == "x0" else (x - torch.sqrt(1 - ab) * out) / torch.sqrt(ab)
        if k == 1:
            x = x0
            break
        ab_prev = abar[k - 2]
        mean = (betas[k - 1] * torch.sqrt(ab_prev) / (1 - ab)) * x0 + (
            (1 - ab_prev) * torch.sqrt(alphas[k - 1]) / (1 - ab)
        ) * x
        var = betas[k - 1] * (1 - ab_prev) / (1 - ab)
        x = mean + max(math.sqrt(var), 0.05) * noise[:, i + 1]
    m, _ = policy(cond, noise)
    assert torch.allclose(m, x, atol=1e-5)


def test_ddpm_closed_form_tiny_case():
    """K=2, epsilon-prediction with a constant eps=e: written out by hand."""
    e, z_start, z_mid = 0.5, 1.2, -0.7
    cfg = DiffusionConfig(denoising_steps=2, prediction="epsilon", beta_min=0.1, beta_max=0.3, sigma_min=0.0)
    sampler = NoiseConditionedSampler(cfg, ConstantDenoiser(e))
    noise = torch.tensor([[[z_start], [z_mid], [0.0]]])
    b1, b2 = 0.1, 0.3
    a1, a2 = 1 - b1, (1 - b1) * (1 - b2)
    x2 = z_start
    x0 = (x2 - math.sqrt(1 - a2) * e) / math.sqrt(a2)
    mean = b2 * math.sqrt(a1) / (1 - a2) * x0 + (1 - a1) * math.sqrt(1 - b2) / (1 - a2) * x2
    x1 = mean + math.sqrt(b2 * (1 - a1) / (1 - a2)) * z_mid
    final = (x1 - math.sqrt(1 - a1) * e) / math.sqrt(a1)
    got = sampler(torch.zeros(1, 1), noise).mean.item()
    assert got == pytest.approx(final, abs=1e-5)


def test_ddim_closed_form_tiny_case():
    """DDIM eta=0, K=3 sampled in 2 steps (3 -> 1 -> 0), constant eps: written out by hand."""
    e, z = 0.3, 0.9
    cfg = DiffusionConfig(
        denoising_steps=3, prediction="epsilon", sampler="ddim", ddim_steps=2, ddim_eta=0.0,
        beta_min=0.1, beta_max=0.3, sigma_min=0.0,
    )
    sampler = NoiseConditionedSampler(cfg, ConstantDenoiser(e))
    assert sampler.timesteps == [3, 1]
    abar = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]
    x3 = z
    x0 = (x3 - math.sqrt(1 - abar[2]) * e) / math.sqrt(abar[2])
    x1 = math.sqrt(abar[0]) * x0 + math.sqrt(1 - abar[0]) * e  # eta=0: no noise
    final = (x1 - math.sqrt(1 - abar[0]) * e) / math.sqrt(abar[0])
    noise = torch.tensor([[[z], [5.0], [0.0]]])  # the middle noise must be ignored (sigma=0)
    assert sampler(torch.zeros(1, 1), noise).mean.item() == pytest.approx(final, abs=1e-5)
    assert torch.allclose(sampler.abar, torch.tensor(abar), atol=1e-6)  # the betas written above


@pytest.mark.parametrize("prediction", ["x0", "epsilon"])
def test_ddim_eta_one_all_steps_equals_ddpm(prediction):
    ddpm = make_policy(denoising_steps=6, prediction=prediction)
    ddim = make_policy(denoising_steps=6, prediction=prediction, sampler="ddim", ddim_eta=1.0)
    ddim.load_state_dict(ddpm.state_dict())
    cond, noise = torch.randn(7, C), torch.randn(7, 7, D)
    assert torch.allclose(ddpm(cond, noise)[0], ddim(cond, noise)[0], atol=1e-5)


@pytest.mark.parametrize("K", [1, 5, 20])
@pytest.mark.parametrize("prediction", ["x0", "epsilon"])
def test_gradients_reach_every_denoising_step(K, prediction):
    cfg = DiffusionConfig(denoising_steps=K, prediction=prediction)
    torch.manual_seed(0)
    base = DenoiserMLP(D, C, [32, 32])
    nn.init.normal_(base.out.weight, std=0.3)
    sampler = NoiseConditionedSampler(cfg, PerStepDenoiser(base, K))
    cond, noise = torch.randn(16, C), torch.randn(16, K + 1, D)
    mean = sampler(cond, noise).mean
    loss = gaussian_log_prob(torch.randn(16, D), mean, torch.zeros(D)).mean()
    loss.backward()
    for k, net in enumerate(sampler.denoiser.copies, start=1):
        norm = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters()))
        assert torch.isfinite(norm) and norm > 1e-8, f"step {k} of {K}: grad norm {norm}"


def test_finetune_last_steps_only():
    K, K_ft = 6, 2
    cfg = DiffusionConfig(denoising_steps=K, finetune_steps=K_ft)
    torch.manual_seed(0)
    base = DenoiserMLP(D, C, [16])
    nn.init.normal_(base.out.weight, std=0.3)
    sampler = NoiseConditionedSampler(cfg, PerStepDenoiser(base, K))
    sampler(torch.randn(4, C), torch.randn(4, K + 1, D)).mean.pow(2).sum().backward()
    got_grad = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
                for net in sampler.denoiser.copies]
    assert got_grad == [True] * K_ft + [False] * (K - K_ft)  # copies indexed by k = 1..K


def test_gradient_checkpointing_gives_same_gradients():
    plain = make_policy(denoising_steps=5)
    ckpt = make_policy(denoising_steps=5, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    cond, noise = torch.randn(6, C), torch.randn(6, 6, D)
    for p in (plain, ckpt):
        mean, log_std = p(cond, noise)
        (mean.pow(2).sum() + log_std.sum()).backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_chain_is_returned_when_asked():
    policy = make_policy(denoising_steps=4)
    cond, noise = torch.randn(3, C), policy.sample_noise(3)
    chain = policy.chain(cond, noise)
    assert len(chain.states) == 5 and len(chain.x0_preds) == 4  # x_K, then one state per step
    assert torch.equal(chain.states[-1], chain.mean) and torch.equal(chain.mean, policy(cond, noise)[0])
    assert torch.equal(chain.x0_preds[-1], chain.mean)  # the last step's mean is its x0 prediction


def test_grad_probe_records_every_step():
    policy = make_policy(denoising_steps=5)
    probe = StepGradNorms()
    assert probe.first_mid_last() == {}
    mean, _ = policy(torch.randn(4, C), policy.sample_noise(4), grad_probe=probe)
    mean.sum().backward()
    assert sorted(probe.norms) == [0, 1, 2, 3, 4] and all(v > 0 for v in probe.norms.values())
    picked = probe.first_mid_last()
    assert all(torch.allclose(picked[f"grad_norm_step_{n}"], probe.norms[i]) for n, i in (("first", 0), ("mid", 2), ("last", 4)))


def test_act_log_prob_matches_closed_form():
    policy = make_policy(denoising_steps=3, init_std=0.7)
    cond, noise = torch.randn(10, C), policy.sample_noise(10)
    action, logp, mean, log_std = policy.act(cond, noise)
    assert torch.allclose(action, mean + 0.7 * noise[:, -1], atol=1e-6)
    ref = torch.distributions.Normal(mean, log_std.exp()).log_prob(action).sum(-1)
    assert torch.allclose(logp, ref, atol=1e-5)


def test_fixed_std_is_not_trained():
    policy = make_policy(std="fixed", init_std=0.1)
    assert "log_std" not in dict(policy.named_parameters())
    assert torch.allclose(policy.final_log_std(2).exp(), torch.full((2, D), 0.1))


def test_x0_prediction_starts_with_small_spread_epsilon_does_not():
    """NCDPO.md section 3: untrained epsilon-prediction copies and amplifies the noise."""
    torch.manual_seed(0)
    cond = torch.randn(4, C)
    x0 = DiffusionPolicy(DiffusionConfig(prediction="x0"), D, C).mean_spread(cond)
    eps = DiffusionPolicy(DiffusionConfig(prediction="epsilon"), D, C).mean_spread(cond)
    assert x0.max() < 0.05 and eps.min() > 0.5


class BiasDenoiser(Denoiser):
    """x0-prediction f = b for every input, b a learnable scalar: lets us saturate the clip."""

    def __init__(self, b: float):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x, k, cond):
        return self.b.expand_as(x)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_x0_clip_bounds_the_mean_and_only_the_soft_clip_keeps_gradients(mode, sampler):
    cfg = DiffusionConfig(denoising_steps=3, x0_clip=1.0, x0_clip_mode=mode, sampler=sampler)
    chain = NoiseConditionedSampler(cfg, BiasDenoiser(5.0))  # x0_hat = 5: saturated
    mean = chain(torch.zeros(8, 1), torch.randn(8, 4, 1)).mean
    assert mean.abs().max() <= 1.0 + 1e-6
    mean.sum().backward()
    grad = chain.denoiser.b.grad.abs().item()
    if mode == "hard":
        assert grad == 0.0  # NCDPO.md: a saturated hard clip zeroes the gradient
    else:
        assert grad > 0.0


@pytest.mark.parametrize("prediction", ["x0", "epsilon"])
def test_bc_loss_decreases(prediction):
    torch.manual_seed(0)
    policy = DiffusionPolicy(DiffusionConfig(prediction=prediction, denoising_steps=5), D, C)
    cond = torch.randn(256, C)
    actions = torch.tanh(cond[:, :D])
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    eval_loss = lambda: policy.bc_loss(cond, actions, generator=torch.Generator().manual_seed(2)).item()
    before = eval_loss()
    for _ in range(200):
        opt.zero_grad()
        policy.bc_loss(cond, actions, generator=gen).backward()
        opt.step()
    assert eval_loss() < 0.5 * before


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ddim_steps"):
        DiffusionConfig(denoising_steps=5, sampler="ddim", ddim_steps=9)
    with pytest.raises(ValueError, match="denoising_steps"):
        DiffusionConfig(denoising_steps=0)


# --- the discrete (logit-diffusion) head ------------------------------------------------

def make_discrete(n=4, **kw) -> DiscreteDiffusionPolicy:
    torch.manual_seed(0)
    policy = DiscreteDiffusionPolicy(DiffusionConfig(**kw), num_actions=n, cond_dim=C)
    nn.init.normal_(policy.sampler.denoiser.out.weight, std=0.3)
    return policy


def test_discrete_log_prob_is_log_softmax_of_logits_recomputed_from_stored_noise():
    policy = make_discrete(denoising_steps=4)
    cond, noise = torch.randn(64, C), policy.sample_noise(64)
    assert noise.shape == (64, 4, 4)  # (B, S, n): every noise the chain reads, no final-step draw
    action, logp, logits = policy.act(cond, noise)
    assert action.dtype == torch.int64 and set(action.tolist()) <= {0, 1, 2, 3}
    recomputed = policy(cond, noise)  # from the stored noise alone: deterministic
    assert torch.equal(recomputed, logits)
    ref = torch.distributions.Categorical(logits=recomputed).log_prob(action)
    assert torch.allclose(logp, torch.log_softmax(recomputed, -1)[torch.arange(64), action], atol=1e-6)
    assert torch.allclose(logp, ref, atol=1e-6)


@pytest.mark.parametrize("K", [1, 5])
def test_discrete_gradients_reach_every_denoising_step(K):
    cfg = DiffusionConfig(denoising_steps=K)
    torch.manual_seed(0)
    base = DenoiserMLP(4, C, [32, 32])
    nn.init.normal_(base.out.weight, std=0.3)
    sampler = NoiseConditionedSampler(cfg, PerStepDenoiser(base, K))
    cond, noise = torch.randn(16, C), torch.randn(16, K, 4)
    logits = sampler(cond, noise).mean
    categorical_log_prob(torch.randint(0, 4, (16,)), logits).mean().backward()
    for k, net in enumerate(sampler.denoiser.copies, start=1):
        norm = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters()))
        assert torch.isfinite(norm) and norm > 1e-8, f"step {k} of {K}: grad norm {norm}"


def test_discrete_sampling_follows_the_softmax():
    policy = make_discrete(n=3, denoising_steps=2)
    cond = torch.randn(1, C).expand(20000, -1)
    noise = policy.sample_noise(1).expand(20000, -1, -1)  # one zeta: one categorical
    action, _, logits = policy.act(cond, noise, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(action, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)


def test_evaluation_uses_its_own_floor_and_ddim_eta():
    """eval_ddim_eta 0 and eval_sigma_min 0 (DPPO's evaluation): the action depends on x_K only;
    exploration still injects every step's noise."""
    from ncdpo_rllib.diffusion import DiffusionPolicy

    cfg = DiffusionConfig(denoising_steps=6, sampler="ddim", ddim_steps=3, ddim_eta=1.0,
                          eval_ddim_eta=0.0, eval_sigma_min=0.0, hidden=[16])
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg, action_dim=2, cond_dim=3)
    cond, a, b = torch.randn(4, 3), policy.sample_noise(4), policy.sample_noise(4)
    b[:, 0] = a[:, 0]  # same start, different intermediate noise
    with torch.no_grad():
        assert torch.allclose(policy(cond, a, evaluation=True)[0], policy(cond, b, evaluation=True)[0])
        assert not torch.allclose(policy(cond, a)[0], policy(cond, b)[0])


# --- diffusion.compile: the compiled chain against the eager one ------------------------------------
COMPILE_ATOL = 1e-5
"""Outputs and gradients of the compiled chain may differ from eager by float reordering (fused
kernels): within 1e-5 absolute (outputs are O(1), gradients here O(0.1..1))."""


def test_mish_sigmoid_form_equals_torchs_mish_in_value_and_gradient():
    """The form the compiled chain uses is torch's mish to float rounding, from far negative (where
    it underflows to 0) to far positive (where it is x), with the gradient autograd derives for it;
    and the activation module keeps nn.Mish's (empty) state."""
    from ncdpo_rllib.diffusion.denoiser import Mish, mish_sigmoid_form

    x = torch.cat([torch.linspace(-60, 60, 4091), torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4])]).view(64, 64)
    ref_x, x = x.clone().requires_grad_(True), x.requires_grad_(True)
    ref, got = torch.nn.functional.mish(ref_x), mish_sigmoid_form(x)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6) and torch.isfinite(got).all()
    upstream = torch.randn_like(ref)
    (ref * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6) and torch.isfinite(x.grad).all()
    assert Mish().state_dict() == nn.Mish().state_dict() == {}


@pytest.mark.slow
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("discrete", [False, True])
def test_compiled_chain_matches_eager(K, discrete):
    """Same mean (or logits), log-prob, parameter gradients and per-step gradient norms, with grad
    (the update) and without (a rollout, under inference_mode)."""
    cls = DiscreteDiffusionPolicy if discrete else DiffusionPolicy
    torch.manual_seed(0)
    eager = cls(DiffusionConfig(denoising_steps=K, hidden=[16, 16]), D, C)
    nn.init.normal_(eager.sampler.denoiser.out.weight, std=0.3)
    compiled = cls(DiffusionConfig(denoising_steps=K, hidden=[16, 16], compile="default"), D, C)
    compiled.load_state_dict(eager.state_dict())
    cond, noise = torch.randn(6, C), eager.sample_noise(6)
    actions = torch.randint(0, D, (6,)) if discrete else torch.randn(6, D)
    results = []
    for policy in (eager, compiled):
        probe = StepGradNorms()
        out = policy(cond, noise, grad_probe=probe)
        logp = categorical_log_prob(actions, out) if discrete else gaussian_log_prob(actions, *out)
        logp.sum().backward()
        with torch.inference_mode():
            rollout = policy(cond[:2], noise[:2])
        results.append(dict(
            out=out if discrete else out[0], logp=logp, rollout=rollout if discrete else rollout[0],
            grads={n: p.grad for n, p in policy.named_parameters() if p.grad is not None},
            step_norms=probe.norms))
    ref, got = results
    assert compiled.sampler._compiled is not None and not compiled.sampler._compile_failed
    for key in ("out", "logp", "rollout"):
        assert torch.allclose(got[key], ref[key], atol=COMPILE_ATOL), key
    assert ref["grads"].keys() == got["grads"].keys() and len(ref["grads"]) > 0
    for name, grad in ref["grads"].items():
        assert torch.allclose(got["grads"][name], grad, atol=COMPILE_ATOL), name
    assert sorted(got["step_norms"]) == list(range(K))
    assert all(torch.allclose(got["step_norms"][i], ref["step_norms"][i], atol=COMPILE_ATOL) for i in range(K))


FALLBACK = """
import torch
from ncdpo_rllib.diffusion import DiffusionConfig, DiffusionPolicy
torch.manual_seed(0)
eager = DiffusionPolicy(DiffusionConfig(denoising_steps=2, hidden=[8]), 2, 3)
policy = DiffusionPolicy(DiffusionConfig(denoising_steps=2, hidden=[8], compile="default"), 2, 3)
policy.load_state_dict(eager.state_dict())
cond, noise = torch.randn(4, 3), eager.sample_noise(4)
for _ in range(2):  # the second call goes straight to eager
    assert torch.equal(policy(cond, noise)[0], eager(cond, noise)[0])
assert policy.sampler._compile_failed
print("ok")
"""


def test_compile_where_it_fails_falls_back_to_eager_with_one_line(tmp_path):
    """A machine without a working C++ compiler (CXX names none) cannot compile for the CPU: the
    chain runs eagerly, the same numbers, after one warning line."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "diffusion.compile" in line]
    assert len(lines) == 1 and "runs eagerly" in lines[0] and "compiler" in lines[0], proc.stderr[-2000:]
