"""`miniai fit` interrupted with Ctrl-C (SIGINT, as a terminal sends it) and carried on with `--resume`.

The resumed run must end with the very same weights as a run that was never interrupted: every tensor of model.pt
bitwise equal. Both runs use the quick CNN on the bundled sample, one torch thread each (so both add up the same
floats in the same order)."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

MINIAI = Path(sys.executable).parent/'miniai'
RUN = ['fit', '--arch', 'cnn', '--epochs', '2', '--bs', '256', '--data', 'sample', '--seed', '3', '--device', 'cpu']

def env():
    return {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}

def run(*args, timeout=300):
    return subprocess.run([str(MINIAI), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env())

def checkpoints(out): return sorted((out/'checkpoints').glob('ckpt-*.pt'))

def interrupt_after_first_checkpoint(*args, timeout=300):
    "Start `miniai *args`, press Ctrl-C once the first checkpoint file exists, and return the finished process."
    out = Path(args[args.index('--out') + 1])
    p = subprocess.Popen([str(MINIAI), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env())
    deadline = time.monotonic() + timeout
    try:
        while not checkpoints(out):
            if p.poll() is not None: pytest.fail(f'the run ended before its first checkpoint: {p.communicate()}')
            if time.monotonic() > deadline: pytest.fail('no checkpoint appeared')
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None: p.kill()
    return p.returncode, stdout, stderr

@pytest.fixture(scope='module')
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp('whole')/'run'
    r = run(*RUN, '--out', out)
    assert r.returncode == 0, r.stderr
    return out

def test_ctrl_c_saves_and_resume_is_bitwise(whole, tmp_path):
    cut = tmp_path/'cut'
    rc, stdout, stderr = interrupt_after_first_checkpoint(*RUN, '--out', cut)
    assert rc == 130, (rc, stderr)
    lines = stderr.strip().splitlines()
    assert lines[-1] == f'miniai: resume with: miniai fit --resume {cut}', stderr
    assert lines[-2].startswith('miniai: interrupted; saved the training state at '), stderr
    assert 'Traceback' not in stderr
    assert not (cut/'model.pt').exists() and checkpoints(cut)

    # the unfinished run is protected, and can't be resumed as something else
    r = run('fit', '--out', cut)
    assert r.returncode == 2 and 'unfinished run' in r.stderr and f'--resume {cut}' in r.stderr, r.stderr
    for flag, value in (('--lr', 0.1), ('--epochs', 3), ('--bs', 128), ('--arch', 'resnet'), ('--seed', 4),
                        ('--data', 'hub')):
        r = run('fit', '--resume', cut, flag, value, timeout=60)
        assert r.returncode == 2 and f'{flag} {value} contradicts the run in {cut}' in r.stderr, r.stderr
    r = run('fit', '--resume', cut, '--out', tmp_path/'elsewhere', timeout=60)
    assert r.returncode == 2 and 'leave --out out' in r.stderr, r.stderr
    np.savez(tmp_path/'x.npz', images=np.zeros((2, 28, 28), np.uint8))
    r = run('predict', '--model', cut, '--images', tmp_path/'x.npz', timeout=60)
    assert r.returncode == 2 and f"carry on with 'miniai fit --resume {cut}'" in r.stderr, r.stderr

    # flags that agree with the saved run are fine; the rest comes from config.json
    r = run('fit', '--resume', cut, '--arch', 'cnn', '--epochs', 2, '--data', 'sample')
    assert r.returncode == 0, r.stderr
    assert 'miniai: resuming the run in' in r.stderr
    a, b = torch.load(whole/'model.pt'), torch.load(cut/'model.pt')
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k
    assert not (cut/'checkpoints').exists()
    ha, hb = (json.loads((o/'config.json').read_text())['history'] for o in (whole, cut))
    assert ([(h['epoch'], h['train'], h['accuracy']) for h in ha]
            == [(h['epoch'], h['train'], h['accuracy']) for h in hb])
    # the epoch that was cut in two adds up its loss in other groups of batches: equal to float rounding
    assert [h['loss'] for h in hb] == pytest.approx([h['loss'] for h in ha], rel=1e-6)

    r = run('fit', '--resume', cut, timeout=60)
    assert r.returncode == 2 and 'has finished' in r.stderr, r.stderr

def test_interrupt_before_any_checkpoint_says_nothing_was_saved(tmp_path):
    "A Ctrl-C while the data loads: nothing to resume, and the message says so."
    out = tmp_path/'early'
    p = subprocess.Popen([str(MINIAI), *RUN, '--out', str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env())
    try:
        while not (out/'config.json').exists():  # written just before training starts
            if p.poll() is not None: pytest.fail(p.communicate())
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 130, stderr
    assert 'Traceback' not in stderr
    last = stderr.strip().splitlines()[-1]
    if checkpoints(out): assert last.startswith('miniai: resume with:'), stderr  # it was quicker than us
    else: assert last == 'miniai: interrupted before the first checkpoint; nothing was saved', stderr

def test_resume_needs_a_run_folder(tmp_path):
    r = run('fit', '--resume', tmp_path, timeout=60)
    assert r.returncode == 2 and 'config.json not found' in r.stderr, r.stderr
    (tmp_path/'config.json').write_text(json.dumps({'arch': 'cnn'}))
    r = run('fit', '--resume', tmp_path, timeout=60)
    assert r.returncode == 2 and 'no checkpoint' in r.stderr, r.stderr

def snapshot(folder):
    "Every file in `folder` with its modification time and bytes: to check that a refused command changed nothing."
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob('*')) if p.is_file()}

def test_a_live_run_is_refused_and_bad_checkpoints_get_one_line_leaving_the_folder_as_it_was(tmp_path, capsys):
    "The refused resumes run in this process (`main`), as they fail before training: quicker than a new process each."
    from miniai.cli import main
    threads = torch.get_num_threads()
    def resume(d):
        try: return main(['fit', '--resume', str(d), '--device', 'cpu']), capsys.readouterr().err
        finally: torch.set_num_threads(threads)
    live = tmp_path/'live'
    p = subprocess.Popen([str(MINIAI), *RUN[:3], '--epochs', '30', *RUN[5:], '--out', str(live)],
                         stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env())
    try:
        while not checkpoints(live):
            if p.poll() is not None: pytest.fail(f'the run ended before its first checkpoint: {p.communicate()}')
            time.sleep(0.02)
        rc, err = resume(live)
        assert p.poll() is None, 'the run should still be going'
        assert rc == 2 and err.splitlines()[-1] == (f"miniai: error: {live/'checkpoints'} is being written by a live "
                                                    "run; wait for it to end, or stop it"), err
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=120)
    assert p.returncode == 130 and (live/'checkpoints'/'lock').exists()  # left behind: only a live process holds it

    def config(d, **kw): (d/'config.json').write_text(json.dumps({**json.loads((d/'config.json').read_text()), **kw}))
    def truncate(d): (f := checkpoints(d)[-1]).write_bytes(f.read_bytes()[:f.stat().st_size//2])
    p = json.loads((live/'config.json').read_text())['precision']  # 'auto': bf16 on a CPU that has it
    q = {'bf16': 'fp32', 'fp32': 'bf16'}[p]
    for spoil, says in ((lambda d: config(d, norm='layer'), 'the checkpoint holds another model (Unexpected key(s)'),
                        (lambda d: config(d, precision=q), f'the checkpoint trained in {p}, this run trains in {q}'),
                        (truncate, 'is damaged (')):
        d = tmp_path/'bad'
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(live, d)
        spoil(d)
        before = snapshot(d)
        rc, err = resume(d)
        assert rc == 2 and 'Traceback' not in err and says in err.splitlines()[-1], (says, err)
        assert snapshot(d) == before, says
