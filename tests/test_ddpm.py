"""miniai.ddpm against diffusers' schedulers, plus the sampler's contract (generator, device, dtype, model use), EMA
warm-up, how the sampler calls the model, and saving/loading a model folder."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from miniai.accel import EMACB
from miniai.ddpm import (DDPMCB, NoiseSched, UNet, collate_ddpm, cosine_sched, ddim_sample, ddim_step,
                         ddim_timesteps, ddpm_step, ddpm_unet, init_ddpm, linear_sched, noisify, respace, sample)
from miniai.ddpm_run import load_ddpm, save_ddpm, save_grid, save_progression, short_run_warning, train_ddpm
from miniai.fid import ddpm_images, ddpm_pixels

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


@pytest.mark.parametrize('rederive', [True, False])
@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(clip, eta, rederive):
    "`rederive` (eps from the clipped x0, our default) is diffusers' `use_clipped_model_output=True`."
    sched = linear_sched()
    n_inf = 50
    ref = _in_float64(DDIMScheduler(trained_betas=sched.beta.numpy(), clip_sample=clip, prediction_type='epsilon',
                                    timestep_spacing='trailing'), sched)
    ref.set_timesteps(n_inf)
    for t in ref.timesteps.tolist():
        x_t, eps = _inputs(t)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=F64)
        out = ref.step(eps, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None,
                       use_clipped_model_output=rederive)
        x_prev, x0 = ddim_step(x_t, eps, t, t - 1000//n_inf, sched, eta=eta, noise=noise, clip=clip, rederive=rederive)
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


@pytest.mark.parametrize('rederive', [True, False])
def test_ddim_sample_matches_a_diffusers_loop(rederive):
    sched, model = linear_sched(), ScaleModel(F64)
    ours = ddim_sample(model, SHAPE, sched, steps=20, generator=torch.Generator().manual_seed(0), rederive=rederive)
    ref = _in_float64(DDIMScheduler(trained_betas=sched.beta.numpy(), timestep_spacing='trailing'), sched)
    ref.set_timesteps(20)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        for t in ref.timesteps.tolist():
            x = ref.step(model(x, torch.full((SHAPE[0],), t)), t, x, use_clipped_model_output=rederive).prev_sample
    _close(ours, x)
    assert (ours - ddim_sample(model, SHAPE, sched, 20, generator=torch.Generator().manual_seed(0),
                               rederive=not rederive)).abs().max() > 1e-3


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


@pytest.mark.parametrize('clip', [True, False])
def test_ddim_eta1_all_steps_is_ddpm(clip):
    "With eps re-derived from the clipped x0, DDIM with eta=1 over every step is DDPM even when clipping."
    sched, model = linear_sched(40, 2e-3, 0.3), ScaleModel(F64)
    g = lambda: torch.Generator().manual_seed(1)
    a = sample(model, SHAPE, sched, generator=g(), clip=clip)
    b = ddim_sample(model, SHAPE, sched, steps=40, eta=1., generator=g(), clip=clip)
    _close(a, b)
    if clip: assert (a - ddim_sample(model, SHAPE, sched, 40, eta=1., generator=g(), rederive=False)).abs().max() > 1e-3


class GaussianOracle(nn.Module):
    """The best possible noise predictor when the data are N(mu, s²) per pixel: E[eps | x_t] in closed form,
    sqrt(1-abar)·(x_t - sqrt(abar)·mu) / (abar·s² + 1 - abar). \
A sampler fed this model must produce that Gaussian."""
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
    c = (sqrt(abar_prev·abar_t)·s² + sqrt((1-abar_prev)(1-abar_t))) / (abar_t·s² + 1 - abar_t) \
(algebra on x0_hat and
    eps_hat), so the whole sampler is one affine map of x_T. c < sqrt(v_prev/v_t) by Cauchy-Schwarz: DDIM shrinks the
    spread a little, the less the more steps it takes, which is the sampler's discretisation error, not a bug."""
    mu, s, sched = 0.3, 0.5, linear_sched()
    ab = sched._abar64
    x = ddim_sample(GaussianOracle(sched, mu, s), SHAPE, sched, steps, generator=torch.Generator().manual_seed(2),
                    clip=False)
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


# --- EMA ------------------------------------------------------------------------------------------------------------

def _ema_run(cb, ws, model=None):
    from types import SimpleNamespace
    lin = model or nn.Linear(3, 2)
    learn = SimpleNamespace(model=lin, cbs=[])
    cb.before_fit(learn)
    for w in ws:
        with torch.no_grad(): lin.weight.copy_(w)
        cb.after_step(learn)
    return cb


def test_ema_cb_average_without_warmup():
    ws = [torch.randn(2, 3) for _ in range(5)]
    cb = _ema_run(EMACB(0.9, warmup=False), ws)
    expect = ws[0].clone()
    for w in ws[1:]: expect = 0.9*expect + 0.1*w
    _close(cb.ema_model.module.weight, expect, 1e-6)


def test_ema_cb_warmup_decay():
    "After n earlier updates the decay is min(decay, (1+n)/(10+n)); the first update copies."
    ws = [torch.randn(2, 3) for _ in range(6)]
    cb = _ema_run(EMACB(0.3), ws)
    expect = ws[0].clone()
    for n, w in enumerate(ws[1:], 1):
        d = min(0.3, (1 + n)/(10 + n))
        expect = d*expect + (1 - d)*w
    _close(cb.ema_model.module.weight, expect, 1e-6)
    assert [EMACB(0.999).decay_at(n) for n in (0, 8, 90)] == pytest.approx([0.1, 0.5, 0.91])
    assert EMACB(0.999).decay_at(100_000) == 0.999 and EMACB(0.999, warmup=False).decay_at(0) == 0.999


def test_ema_warmup_moves_towards_the_weights_after_a_few_steps():
    "After 30 steps from w0 to a fixed w1, the warm-up EMA is close to w1; the plain 0.999 average hardly moved."
    w0, w1 = torch.zeros(2, 3), torch.ones(2, 3)
    warm = _ema_run(EMACB(0.999), [w0] + [w1]*30).ema_model.module.weight
    plain = _ema_run(EMACB(0.999, warmup=False), [w0] + [w1]*30).ema_model.module.weight
    assert (warm > 0.99).all() and (plain < 0.05).all(), (warm, plain)


def test_ema_cb_averages_floats_and_copies_integer_buffers():
    from types import SimpleNamespace
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    cb = EMACB(0.9); learn = SimpleNamespace(model=m, cbs=[])
    cb.before_fit(learn)
    for _ in range(3):
        m.train()(torch.randn(8, 3))  # batch norm counts its batches in an int64 buffer
        cb.after_step(learn)
    assert cb.ema_model.module[1].num_batches_tracked.item() == 3
    assert cb.ema_model.module[1].running_mean.abs().sum() > 0


@pytest.mark.parametrize('bad', [1.0, -0.1, True, '0.9'])
def test_ema_cb_refuses_bad_decay(bad):
    with pytest.raises(ValueError, match='decay'): EMACB(bad)


# --- how the sampler calls the model -------------------------------------------------------------------------------

class PairModel(nn.Module):
    "A course-style model: forward takes one input, the (xt, t) pair."
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
    def forward(self, x):
        xt, t = x
        return self.w*xt


class ArgsModel(nn.Module):
    "A wrapper whose signature can't tell: forward(*args)."
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, *args): return self.inner(*args)


def test_sampler_calls_a_one_input_model_with_the_pair():
    sched, m = linear_sched(10, 1e-2, 0.5), PairModel()
    for f in (lambda **k: sample(m, SHAPE, sched, **k), lambda **k: ddim_sample(m, SHAPE, sched, 5, **k),
              lambda **k: DDPMCB(sched=sched).sample(m, SHAPE, **k)):
        assert f(generator=torch.Generator().manual_seed(0)).shape == SHAPE
    with pytest.raises(TypeError): sample(m, SHAPE, sched, pair_input=False)


def test_sampler_rule_for_wrappers_and_unclear_signatures():
    from torch.optim.swa_utils import AveragedModel
    sched = linear_sched(10, 1e-2, 0.5)
    assert sample(AveragedModel(PairModel()), SHAPE, sched).shape == SHAPE  # looked through .module
    unclear_pair, unclear_two = ArgsModel(PairModel()), ArgsModel(ScaleModel())
    assert DDPMCB(sched=sched).sample(unclear_pair, SHAPE).shape == SHAPE  # DDPMCB trained with the pair
    assert sample(unclear_two, SHAPE, sched).shape == SHAPE  # sample's default: two arguments
    assert sample(unclear_pair, SHAPE, sched, pair_input=True).shape == SHAPE
    with pytest.raises(TypeError): DDPMCB(sched=sched).sample(unclear_two, SHAPE)


def test_our_unet_takes_either_call():
    m = init_ddpm(ddpm_unet((8, 16), 1, 4))
    sched = linear_sched(10, 1e-2, 0.5)
    a = sample(m, (2, 1, 32, 32), sched, generator=torch.Generator().manual_seed(0), pair_input=True)
    b = sample(m, (2, 1, 32, 32), sched, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


class SizeModel(nn.Module):
    "Records the batch size of each call; each image's output depends on that image alone."
    def __init__(self):
        super().__init__()
        self.sizes = []
    def forward(self, x, t):
        self.sizes.append(len(x))
        return 0.3*x + t[:, None, None, None]/1000


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_sampling_on_a_cpu_calls_the_model_in_chunks_with_the_same_result(monkeypatch, sampler):
    import miniai.ddpm as ddpm
    sched, shape = linear_sched(10, 1e-2, 0.5), (10, 1, 4, 4)
    run = lambda m: (sample(m, shape, sched, generator=torch.Generator().manual_seed(0)) if sampler == 'ddpm' else
                     ddim_sample(m, shape, sched, 5, eta=1., generator=torch.Generator().manual_seed(0)))
    whole = run(m1 := SizeModel())
    assert set(m1.sizes) == {10}  # the default chunk holds all ten
    monkeypatch.setattr(ddpm, 'SAMPLE_BS', 4)
    chunked = run(m2 := SizeModel())
    assert m2.sizes == [4, 4, 2]*len(m1.sizes)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    unet = init_ddpm(ddpm_unet((8, 16), 1, 4))
    nn.init.normal_(unet.conv_out.weight)  # not the zero output init_ddpm gives, so the chunks matter
    a = ddim_sample(unet, (5, 1, 32, 32), sched, 3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ddpm, 'SAMPLE_BS', 2)
    b = ddim_sample(unet, (5, 1, 32, 32), sched, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sample_refuses_the_course_signature():
    with pytest.raises(TypeError, match=r'ddpm_cb.sample\(model, sz\)'):
        sample(ScaleModel(), SHAPE, linear_sched().alpha, linear_sched().abar)


def test_sample_progress_prints_lines_with_time_left(capsys):
    sample(ScaleModel(), SHAPE, linear_sched(20, 5e-3, 0.5), progress=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith('DDPM, 20 steps: step 20/20') and 'left' in lines[0], lines
    ddim_sample(ScaleModel(), SHAPE, linear_sched(20, 5e-3, 0.5), 4, progress=True)
    assert capsys.readouterr().out.count('DDIM, 4 steps: step') == 4


# --- images, pictures, saving and loading --------------------------------------------------------------------------

def test_ddpm_pixels_undoes_ddpm_images():
    x = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    assert torch.equal(ddpm_pixels(ddpm_images(x)), x)
    assert ddpm_pixels(torch.full((1, 1, 32, 32), 3.)).unique().tolist() == [255]  # clipped, not wrapped around
    with pytest.raises(TypeError): ddpm_pixels(x)


def test_saved_pngs_are_grids_with_titles(tmp_path):
    import matplotlib.pyplot as plt
    imgs = torch.rand(10, 1, 32, 32)*2 - 1
    wide, tall = (plt.imread(save_grid(imgs, tmp_path/f'{n}.png', nrow=n, title='a title')) for n in (5, 2))
    assert wide.shape[1] > 1.5*wide.shape[0] and tall.shape[0] > 2*tall.shape[1], (wide.shape, tall.shape)  # 2×5, 5×2
    assert wide.min() < 0.1 and wide.max() > 0.9  # the images are drawn, black to white
    sched, model = linear_sched(30, 5e-3, 0.3), ScaleModel()
    _, traj = sample(model, (3, 1, 32, 32), sched, return_traj=True, traj_every=10)
    p = plt.imread(save_progression(traj, tmp_path/'p.png', n_frames=4, n_images=2, title='walk'))
    assert p.shape[1] > 1.5*p.shape[0], p.shape  # 2 rows of 4 frames
    with pytest.raises(ValueError, match="'x0', 'xt'"): save_progression(traj, tmp_path/'q.png', which='eps')


def test_save_and_load_ddpm_round_trip(tmp_path):
    run = train_ddpm(epochs=1, bs=32, n_steps=50, n_train=64, channels=(8, 16), groups=4, source='sample', device='cpu',
                     seed=0, progress=False)
    save_ddpm(run, tmp_path/'m', note='x')
    model, sched, cfg = load_ddpm(tmp_path/'m')
    assert cfg == {**run.config, 'note': 'x'} and cfg['opt_steps'] == 2
    assert torch.equal(sched.abar, run.sched.abar)
    for a, b in zip(model.state_dict().values(), run.ema_model.module.state_dict().values()): assert torch.equal(a, b)
    raw = load_ddpm(tmp_path/'m', 'raw')[0]
    for a, b in zip(raw.state_dict().values(), run.model.state_dict().values()): assert torch.equal(a, b)
    assert short_run_warning(cfg).startswith('warning: only 2 optimizer steps')
    # a schedule without a name is saved as its betas
    run.sched, run.config['sched'] = respace(linear_sched(), 50), None
    save_ddpm(run, tmp_path/'r')
    assert torch.equal(load_ddpm(tmp_path/'r')[1].abar, run.sched.abar)
    with pytest.raises(FileNotFoundError, match='config.json not found'): load_ddpm(tmp_path/'nothing')
