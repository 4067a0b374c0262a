"""The main jobs' precision: 'auto' picks bf16 on a CPU that computes it natively and fp32 on one that doesn't,
`--precision` overrides it, config.json records it, and a resume keeps it.

`cpu_has_bf16()` is faked (both ways), so these tests check the same things on every CPU. Runs are tiny (the quick
CNN for one epoch, a DDPM of a few steps), in this process, with one thread."""
import json, os, shutil

import pytest
import torch

import miniai.accel
from miniai.accel import pick_precision
from miniai.cli import main

FIT = ['fit', '--arch', 'cnn', '--epochs', '2', '--bs', '512', '--data', 'sample', '--seed', '3', '--device', 'cpu']
DDPM = ['ddpm', '--epochs', '1', '--steps', '50', '--ddim-steps', '2', '--n', '2', '--channels', '8,16',
        '--n-train', '64',
        '--bs', '32', '--data', 'sample', '--device', 'cpu']


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fake_bf16(monkeypatch, has):
    monkeypatch.setattr(miniai.accel, 'cpu_has_bf16', lambda: has)


def config(out): return json.loads((out/'config.json').read_text())


def test_auto_picks_bf16_only_where_the_cpu_has_it(monkeypatch):
    fake_bf16(monkeypatch, True)
    assert pick_precision('auto', 'cpu') == ('bf16', 'this CPU computes bf16 natively')
    assert pick_precision('fp32', 'cpu') == ('fp32', 'asked for')
    fake_bf16(monkeypatch, False)
    assert pick_precision('auto', 'cpu') == ('fp32', 'cpu without native bf16')
    with pytest.warns(UserWarning, match='emulates bf16'): assert pick_precision('bf16', 'cpu')[0] == 'bf16'
    with pytest.raises(ValueError, match='fp16 is a CUDA GPU feature'): pick_precision('fp16', 'cpu')
    with pytest.raises(ValueError, match="one of 'auto', 'fp32', 'bf16'"): pick_precision('fp8', 'cpu')


def test_fit_says_and_records_its_precision_and_the_flag_overrides(monkeypatch, tmp_path, capsys):
    fake_bf16(monkeypatch, False)  # auto: fp32, and the run's steps are TrainCB's
    assert main([*FIT, '--out', str(tmp_path/'auto')]) == 0
    assert 'miniai: training in fp32: cpu without native bf16' in capsys.readouterr().err
    assert config(tmp_path/'auto')['precision'] == 'fp32'
    fake_bf16(monkeypatch, True)
    assert main([*FIT, '--epochs', '1', '--precision', 'fp32', '--out', str(tmp_path/'fp32')]) == 0
    assert 'miniai: training in fp32: asked for' in capsys.readouterr().err
    assert config(tmp_path/'fp32')['precision'] == 'fp32'


def test_ddpm_trains_in_bf16_where_auto_picks_it(monkeypatch, tmp_path, capsys):
    fake_bf16(monkeypatch, True)
    seen = []
    orig = miniai.accel.MixedPrecision.before_fit
    def spy(self, learn): orig(self, learn); seen.append(self.amp_dtype)
    monkeypatch.setattr(miniai.accel.MixedPrecision, 'before_fit', spy)
    assert main([*DDPM, '--out', str(tmp_path/'d')]) == 0
    assert 'miniai: training in bf16: this CPU computes bf16 natively' in capsys.readouterr().err
    assert seen == [torch.bfloat16]
    assert config(tmp_path/'d')['precision'] == 'bf16'
    assert main([*DDPM, '--precision', 'fp32', '--out', str(tmp_path/'f')]) == 0
    assert config(tmp_path/'f')['precision'] == 'fp32' and seen == [torch.bfloat16]  # no MixedPrecision this time


def test_resume_keeps_the_runs_precision_and_refuses_another(monkeypatch, tmp_path, capsys):
    fake_bf16(monkeypatch, True)
    out = tmp_path/'run'
    monkeypatch.setattr(shutil, 'rmtree', lambda *a, **k: None)  # keep the checkpoints: an "unfinished" run
    assert main([*FIT, '--precision', 'fp32', '--out', str(out)]) == 0
    monkeypatch.undo()
    fake_bf16(monkeypatch, True)
    os.remove(out/'model.pt')
    os.remove(sorted((out/'checkpoints').glob('ckpt-*.pt'))[-1])  # it stopped after the first epoch
    capsys.readouterr()
    assert main(['fit', '--resume', str(out), '--precision', 'bf16']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--precision bf16 contradicts the run' in err and '(--precision fp32)' in err, err
    assert main(['fit', '--resume', str(out)]) == 0  # auto would say bf16 here: the run's fp32 is kept
    err = capsys.readouterr().err
    assert err.rstrip().endswith('the end of epoch 0, fp32') and 'training in' not in err, err
    assert config(out)['precision'] == 'fp32' and config(out)['resumed']


def test_bf16_recipe_is_channels_last_and_its_weights_load_into_either_layout(tmp_path):
    from miniai.datasets import fashion_dls
    from miniai.recipe import build_model, load_run, recipe_learner, save_run
    dls = fashion_dls(bs=64, source='sample', seed=0)
    cl, plain = (recipe_learner(dls, 1, precision=p, progress=False).model for p in ('bf16', 'fp32'))
    is_cl = lambda m: [not w.is_contiguous() for w in m.parameters()
                       if w.ndim == 4 and w.shape[1] > 1 and w.shape[2] > 1]
    assert all(is_cl(cl)) and not any(is_cl(plain))  # (1 input channel or a 1×1 kernel: the layouts are the same)
    save_run(tmp_path/'cl', dict(arch='resnet', nfs=None, norm='batch'), model=cl)
    loaded, _ = load_run(tmp_path/'cl', lambda c: build_model())  # a fresh, contiguous model
    x = torch.randn(8, 1, 28, 28)
    cl.eval()
    torch.testing.assert_close(loaded(x), cl(x), rtol=1e-5, atol=1e-5)  # the same model: only the layout differs
    plain.load_state_dict(cl.state_dict())
    cl.load_state_dict(loaded.state_dict())  # and back into channels_last, which it keeps
    assert all(is_cl(cl))
    torch.testing.assert_close(plain.eval()(x), cl(x), rtol=1e-5, atol=1e-5)
