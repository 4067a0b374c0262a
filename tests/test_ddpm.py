"""miniai.ddpm against diffusers' schedulers, plus the sampler's contract (generator, device, dtype, model use)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from miniai.ddpm import (EMACB, NoiseSched, collate_ddpm, cosine_sched, ddim_sample, ddim_step, ddim_timesteps,
                         ddpm_step, fid, kid, linear_sched, noisify, respace, sample)

SHAPE = (3, 1, 8, 8)
STEPS_TO_CHECK = [0, 1, 2, 17, 500, 998, 999]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t, eps = torch.randn(SHAPE, generator=g, dtype=F64), torch.randn(SHAPE, generator=g, dtype=F64)
    return x_t*1.5, eps  # scaled so some of x0_hat falls outside [-1, 1] and clipping matters


F64 = torch.float64
def _close(a, b, tol=1e-10): torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _in_float64(ref, sched):
    """Make diffusers scheduler `ref` use `sched`'s abar in float64 (it computes in float32, whose rounding in
    1 - abar_t/abar_prev near t=0 is ~1e-4 relative), so the two can be compared to float64 precision."""
    ref.alphas_cumprod = sched._abar64.clone()
    ref.one = ref.final_alpha_cumprod = torch.tensor(1., dtype=F64)
    return ref


# --- schedules -----------------------------------------------------------------------------------------------------

def test_linear_sched_matches_diffusers():
    ours, theirs = linear_sched(), DDPMScheduler()
    _close(ours.beta, theirs.betas, 1e-6)
    _close(ours.abar, theirs.alphas_cumprod, 1e-6)


def test_cosine_sched_matches_diffusers():
    ours, theirs = cosine_sched(1000), DDPMScheduler(beta_schedule='squaredcos_cap_v2')
    _close(ours.beta, theirs.betas, 1e-6)


def test_respace_keeps_abar_exactly():
    s = linear_sched()
    r = respace(s, 50)
    ts = torch.linspace(0, 999, 50).round().long()
    torch.testing.assert_close(r.abar, s.abar[ts])
    assert r.abar[0] == s.abar[0]


@pytest.mark.parametrize('bad', [[], [0.0, 0.1], [0.1, 1.0], [[0.1]]])
def test_noise_sched_rejects_bad_betas(bad):
    with pytest.raises(ValueError): NoiseSched(bad)


# --- one sampling step against diffusers --------------------------------------------------------------------------

@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('var', ['small', 'large'])
def test_ddpm_step_matches_diffusers(clip, var):
    sched = linear_sched()
    ref = _in_float64(DDPMScheduler(trained_betas=sched.beta.numpy(), clip_sample=clip, prediction_type='epsilon',
                                    variance_type='fixed_small' if var == 'small' else 'fixed_large'), sched)
    for t in STEPS_TO_CHECK:
        x_t, eps = _inputs(t)
        # diffusers draws its noise inside step() with randn(shape, generator); draw ours the same way
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + t), dtype=F64)
        out = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(100 + t))
        x_prev, x0 = ddpm_step(x_t, eps, t, sched, noise=noise, clip=clip, var=var)
        _close(x0, out.pred_original_sample)
        _close(x_prev, out.prev_sample)


@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(clip, eta):
    sched = linear_sched()
    n_inf = 50
    ref = _in_float64(DDIMScheduler(trained_betas=sched.beta.numpy(), clip_sample=clip, prediction_type='epsilon',
                                    timestep_spacing='trailing'), sched)
    ref.set_timesteps(n_inf)
    for t in ref.timesteps.tolist():
        x_t, eps = _inputs(t)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=F64)
        out = ref.step(eps, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None)
        x_prev, x0 = ddim_step(x_t, eps, t, t - 1000//n_inf, sched, eta=eta, noise=noise, clip=clip)
        _close(x0, out.pred_original_sample)
        _close(x_prev, out.prev_sample)


def test_ddim_timesteps_match_diffusers_trailing():
    for n_inf in (10, 50, 100, 1000):
        ref = DDIMScheduler(timestep_spacing='trailing')
        ref.set_timesteps(n_inf)
        assert ddim_timesteps(1000, n_inf) == ref.timesteps.tolist()


# --- whole sampling loops -----------------------------------------------------------------------------------------

class ScaleModel(nn.Module):
    "A stand-in noise predictor: eps_hat = w*x_t + t/1000; records the steps it is called with."
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.calls = []
    def forward(self, x, t):
        self.calls.append(t.clone())
        return self.w*x + t.view(-1, 1, 1, 1).to(x.dtype)/1000


def test_sample_matches_a_diffusers_loop():
    sched = linear_sched(50, 1e-3, 0.2)
    model = ScaleModel(F64)
    ours = sample(model, SHAPE, sched, generator=torch.Generator().manual_seed(0))
    ref = _in_float64(DDPMScheduler(num_train_timesteps=50, trained_betas=sched.beta.numpy()), sched)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, dtype=F64)
    with torch.no_grad():
        for t in range(49, -1, -1): x = ref.step(model(x, torch.full((SHAPE[0],), t)), t, x, generator=g).prev_sample
    _close(ours, x)


def test_ddim_sample_matches_a_diffusers_loop():
    sched, model = linear_sched(), ScaleModel(F64)
    ours = ddim_sample(model, SHAPE, sched, steps=20, generator=torch.Generator().manual_seed(0))
    ref = _in_float64(DDIMScheduler(trained_betas=sched.beta.numpy(), timestep_spacing='trailing'), sched)
    ref.set_timesteps(20)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        for t in ref.timesteps.tolist(): x = ref.step(model(x, torch.full((SHAPE[0],), t)), t, x).prev_sample
    _close(ours, x)


def test_sample_is_repeatable_and_uses_the_models_device_and_dtype():
    sched = linear_sched(20, 5e-3, 0.5)
    model = ScaleModel(torch.float64).train()
    a = sample(model, SHAPE, sched, generator=torch.Generator().manual_seed(3))
    b = sample(model, SHAPE, sched, generator=torch.Generator().manual_seed(3))
    c = sample(model, SHAPE, sched, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float64 and a.device == model.w.device
    assert model.training  # put back in train mode afterwards
    # one call per step, from the noisiest step down, with one t per image
    ts = [int(t[0]) for t in model.calls[-20:]]
    assert ts == list(range(19, -1, -1)) and all(t.shape == (SHAPE[0],) for t in model.calls)
    d = ddim_sample(model, SHAPE, sched, steps=5, generator=torch.Generator().manual_seed(3))
    assert d.dtype == torch.float64


def test_sample_trajectory():
    sched, model = linear_sched(30, 5e-3, 0.3), ScaleModel()
    imgs, traj = sample(model, SHAPE, sched, return_traj=True, traj_every=10)
    assert traj.t == [29, 19, 9, 0]
    assert traj.xt.shape == traj.x0.shape == (4, *SHAPE)
    assert torch.equal(traj.x0[-1], imgs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_sample_on_gpu_keeps_device():
    "Runs only where there is a GPU."
    model = ScaleModel().cuda()
    out = sample(model, SHAPE, linear_sched(10, 1e-2, 0.5), generator=torch.Generator('cuda').manual_seed(0))
    assert out.device.type == 'cuda'


def test_generator_on_the_wrong_device_is_refused():
    if not torch.cuda.is_available(): pytest.skip('needs a GPU to make a mismatched generator')
    with pytest.raises(ValueError, match='generator'):
        sample(ScaleModel(), SHAPE, linear_sched(10, 1e-2, 0.5), generator=torch.Generator('cuda'))


def test_ddim_eta1_all_steps_is_ddpm():
    sched, model = linear_sched(40, 2e-3, 0.3), ScaleModel(F64)
    a = sample(model, SHAPE, sched, generator=torch.Generator().manual_seed(1), clip=False)
    b = ddim_sample(model, SHAPE, sched, steps=40, eta=1., generator=torch.Generator().manual_seed(1), clip=False)
    _close(a, b)


class GaussianOracle(nn.Module):
    """The best possible noise predictor when the data are N(mu, s²) per pixel: E[eps | x_t] in closed form,
    sqrt(1-abar)·(x_t - sqrt(abar)·mu) / (abar·s² + 1 - abar). A sampler fed this model must produce that Gaussian."""
    def __init__(self, sched, mu, s):
        super().__init__()
        self.abar, self.mu, self.s = sched._abar64, mu, s
        self.w = nn.Parameter(torch.zeros((), dtype=F64))  # the sampler reads the device and dtype from a parameter
    def forward(self, x, t):
        ab = self.abar[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt()*(x - ab.sqrt()*self.mu)/(ab*self.s**2 + 1 - ab)


def test_ddpm_sample_with_an_oracle_gives_the_data_distribution():
    sched = linear_sched()
    x = sample(GaussianOracle(sched, 0.3, 0.5), (4000, 1, 2, 2), sched, generator=torch.Generator().manual_seed(0),
               clip=False)
    assert abs(x.mean() - 0.3) < 0.01 and abs(x.std() - 0.5) < 0.01, (x.mean(), x.std())


@pytest.mark.parametrize('steps', [10, 50])
def test_ddim_sample_with_an_oracle_is_the_exact_linear_map(steps):
    """With Gaussian data, each deterministic DDIM step maps x_t - sqrt(abar_t)·mu to c·(that) with
    c = (sqrt(abar_prev·abar_t)·s² + sqrt((1-abar_prev)(1-abar_t))) / (abar_t·s² + 1 - abar_t) (algebra on x0_hat and
    eps_hat), so the whole sampler is one affine map of x_T. c < sqrt(v_prev/v_t) by Cauchy-Schwarz: DDIM shrinks the
    spread a little, the less the more steps it takes, which is the sampler's discretisation error, not a bug."""
    mu, s, sched = 0.3, 0.5, linear_sched()
    ab = sched._abar64
    x = ddim_sample(GaussianOracle(sched, mu, s), SHAPE, sched, steps, generator=torch.Generator().manual_seed(2), clip=False)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    ts = ddim_timesteps(len(sched), steps)
    c = torch.tensor(1., dtype=F64)
    for t, tp in zip(ts, ts[1:] + [-1]):
        a, ap = ab[t], (ab[tp] if tp >= 0 else torch.tensor(1., dtype=F64))
        c = c*((ap*a).sqrt()*s**2 + ((1 - ap)*(1 - a)).sqrt())/(a*s**2 + 1 - a)
    _close(x, mu + c*(x_T - ab[ts[0]].sqrt()*mu), tol=1e-8)
    assert 0.7*s < c*(ab[ts[0]]*s**2 + 1 - ab[ts[0]]).sqrt() < s  # a slightly smaller spread than the data's


# --- noisify and collate ------------------------------------------------------------------------------------------

def test_noisify_matches_diffusers_add_noise():
    sched, ref = linear_sched(), DDPMScheduler()
    x0 = torch.rand(6, 1, 8, 8)*2 - 1
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    (xt, t2), eps = noisify(x0, sched.abar, t=t)
    assert torch.equal(t2, t)
    _close(xt, ref.add_noise(x0, eps, t), 1e-4)  # float32: abar differs in its last bits


def test_collate_ddpm_dict_items():
    sched = linear_sched()
    items = [{'image': torch.zeros(1, 4, 4), 'label': 3} for _ in range(5)]
    xt, t, eps = collate_ddpm(items, sched.abar, xl='image', flat=True)
    assert xt.shape == eps.shape == (5, 1, 4, 4) and t.shape == (5,)
    _close(xt, (1 - sched.abar[t]).sqrt().view(-1, 1, 1, 1)*eps, 1e-6)  # x0 = 0: only noise left


# --- EMA and FID/KID ----------------------------------------------------------------------------------------------

def test_ema_cb_average():
    from types import SimpleNamespace
    lin = nn.Linear(3, 2)
    cb, learn = EMACB(0.9), SimpleNamespace(model=lin)
    cb.before_fit(learn)
    ws = [torch.randn(2, 3) for _ in range(5)]
    expect = None
    for w in ws:
        with torch.no_grad(): lin.weight.copy_(w)
        cb.after_step(learn)
        expect = w.clone() if expect is None else 0.9*expect + 0.1*w
    _close(cb.ema_model.module.weight, expect, 1e-6)


def test_fid_matches_a_direct_formula():
    torch.manual_seed(0)
    a, b = torch.randn(300, 6), torch.randn(400, 6) @ torch.randn(6, 6) + 0.5
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(ca cb) as the sum of square roots of the (real, non-negative) eigenvalues of ca cb
    tr = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    expect = (a.mean(0) - b.mean(0)).pow(2).sum() + ca.trace() + cb.trace() - 2*tr
    assert fid(a, b) == pytest.approx(expect.item(), rel=1e-8)
    assert fid(a, a) == pytest.approx(0., abs=1e-8)


def test_kid_matches_a_loop():
    torch.manual_seed(0)
    a, b = torch.randn(7, 3).double(), (torch.randn(9, 3) + 1).double()
    k = lambda x, y: (float(x @ y)/3 + 1)**3
    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j)/(7*6)
    bb = sum(k(b[i], b[j]) for i in range(9) for j in range(9) if i != j)/(9*8)
    ab = sum(k(x, y) for x in a for y in b)/(7*9)
    assert kid(a, b) == pytest.approx(aa + bb - 2*ab, rel=1e-10)
