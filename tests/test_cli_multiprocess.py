"""`miniai fit` unchanged under `accelerate launch` with two CPU processes, against one process; Ctrl-C and resume.

The route is test_accel.py's: `accelerate launch --multi_gpu --num_processes 2` starts the processes with torchrun,
and `--device cpu` makes each use the CPU and the gloo backend.

What makes the two runs equal: the same initial weights (same seed), the same batches (each process gets its half of
every global batch of --bs, in the single process's order, the last short one shared 29 + 29), the same mean loss
(DDP averages two equal halves' gradients), no augmentation (--arch cnn) and no batch statistics (--norm layer: each
image is normalised on its own; with batch norm each process would normalise over its own 256 images, not 512).

What keeps them from being bitwise equal: the gradients are summed in another order. How much that shows depends on
the training: AdamW at the default lr 2e-2 amplifies such rounding, so even one process with 1 thread and with 2
threads ends up ~1e-2 apart after an epoch. At lr 1e-4 over one epoch (15 steps) one process with 1 and 2 threads
agreed to ~4e-6, while the weights moved by ~7e-4; the runs here take two epochs (30 steps), and the test checks
that the weights moved more than 5e-4. That is where 1e-4 is a meaningful tolerance: a process that trained on the
wrong images would be off by about as much as the weights moved.

A two-process run interrupted with Ctrl-C mid-epoch and resumed under the same launch is another matter: the same
processes add up the same floats in the same order, so it must end bitwise where the uninterrupted one did."""
import csv, json, os, re, signal, socket, subprocess, sys, time
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

MINIAI = Path(sys.executable).parent/'miniai'
RUN = ['fit', '--arch', 'cnn', '--norm', 'layer', '--epochs', '2', '--bs', '512', '--lr', '1e-4', '--data', 'sample',
       '--seed', '1', '--device', 'cpu', '--precision', 'fp32']  # the comparison is in fp32

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def env():
    return {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1',
            'PYTHONWARNINGS': 'ignore'}

LAUNCH = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
          '--num_machines', '1',
          '--mixed_precision', 'no', '--dynamo_backend', 'no']

def launch(*args, **kw):
    "`miniai *args` under `accelerate launch` with two processes, as a Popen (with `kw`) in its own process group."
    return subprocess.Popen([*LAUNCH, '--main_process_port', str(free_port()), str(MINIAI), *map(str, args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)

def finish(p, timeout=300):
    try: return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired: pytest.fail(f'the two processes hung (no result in {timeout}s)')
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)

@pytest.fixture(scope='module')
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp('two')/'run'
    p = launch(*RUN, '--out', out)
    stdout, stderr = finish(p)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return out, SimpleNamespace(returncode=p.returncode, stdout=stdout, stderr=stderr)

def test_two_processes_train_as_one(two, tmp_path):
    (tmp_path/'two').symlink_to(two[0])
    two = two[1]
    one = subprocess.run([str(MINIAI), *RUN, '--out', str(tmp_path/'one')], capture_output=True, text=True, timeout=300,
                         env=env())
    assert one.returncode == 0, one.stderr

    # only the main process prints: one table, one line per epoch and split; one final message
    lines = two.stdout.splitlines()
    assert sum(l.split()[:1] == ['accuracy'] for l in lines) == 1, two.stdout
    # the header ends in 'train' too
    assert sum(l.split()[-1:] in (['train'], ['eval']) for l in lines) == 5, two.stdout
    assert sum(l.startswith('saved model.pt') for l in lines) == 1, two.stdout

    cfg2, cfg1 = (json.loads((tmp_path/d/'config.json').read_text()) for d in ('two', 'one'))
    assert (cfg2['processes'], cfg1['processes']) == (2, 1)
    assert not (tmp_path/'two'/'checkpoints').exists()
    # the gathered metrics are the single process's: every validation image counted once, in the same batches
    for h2, h1 in zip(cfg2['history'], cfg1['history'], strict=True):
        assert (h2['epoch'], h2['train']) == (h1['epoch'], h1['train'])
        assert h2['loss'] == pytest.approx(h1['loss'], rel=1e-5), (h2, h1)
        assert h2['accuracy'] == pytest.approx(h1['accuracy'], abs=1.5e-3), (h2, h1)  # a flipped argmax or two at most

    w2, w1 = (torch.load(tmp_path/d/'model.pt', weights_only=True) for d in ('two', 'one'))
    assert w2.keys() == w1.keys()  # saved unwrapped: no DDP 'module.' prefix, so predict can load it
    torch.manual_seed(1)
    from miniai.recipe import build_model
    w0 = build_model('cnn', norm='layer').state_dict()  # fit's initial weights for --seed 1
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    assert moved > 5e-4, moved  # the tolerance below is well under how far training moved the weights
    for k in w1: torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4, msg=k)

def snapshot(folder):
    "Every file in `folder` with its modification time and bytes: to check that a refused command changed nothing."
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob('*')) if p.is_file()}

def read_csv(path):
    "metrics.csv as rows, checking it is well-formed: one header, every row complete."
    rows = list(csv.reader(path.open()))
    assert rows[0] == ['accuracy', 'loss', 'epoch', 'train'] and all(len(r) == 4 for r in rows), rows
    return rows[1:]

def test_ctrl_c_then_resume_under_the_same_launch_ends_bitwise_as_the_whole_run(two, tmp_path, capsys):
    cut = tmp_path/'cut'
    p = launch(*RUN, '--out', cut)
    deadline = time.monotonic() + 300
    while not list((cut/'checkpoints').glob('ckpt-*.pt')):  # the end of epoch 0
        if p.poll() is not None or time.monotonic() > deadline: pytest.fail(f'no checkpoint: {finish(p)}')
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: it reaches the launcher and both processes
    stdout, stderr = finish(p)
    assert p.returncode != 0 and not (cut/'model.pt').exists(), stderr[-3000:]
    assert stderr.count(f'miniai: resume with: miniai fit --resume {cut}') == 1, stderr[-3000:]  # the main process's
    assert re.search(r'miniai: interrupted; saved the training state at epoch 1, batch \d+ in', stderr), stderr[-3000:]
    # the header ends in 'train'
    printed = [l for l in stdout.splitlines() if l.split()[-1:] in (['train'], ['eval'])][1:]
    assert len(read_csv(cut/'metrics.csv')) == len(printed) == 2, stdout

    # one process is refused in one line, changing nothing (in this process: it fails before training, so quicker)
    from miniai.cli import main
    before, threads = snapshot(cut), torch.get_num_threads()
    try: assert main(['fit', '--resume', str(cut), '--device', 'cpu']) == 2
    finally: torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith('was saved by 2 processes, this run has 1; resume it with 2'), err
    assert snapshot(cut) == before

    p = launch('fit', '--resume', cut)
    stdout, stderr = finish(p)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert stderr.count('miniai: resuming the run in') == 1, stderr
    a, b = (torch.load(d/'model.pt', weights_only=True) for d in (two[0], cut))
    for k in a: assert torch.equal(a[k], b[k]), k
    hist = json.loads((cut/'config.json').read_text())['history']
    assert read_csv(cut/'metrics.csv') == [[repr(h['accuracy']), repr(h['loss']), str(h['epoch']),
                                            ('eval', 'train')[h['train']]]
                                          for h in hist]  # every row once, continued across the interrupt
