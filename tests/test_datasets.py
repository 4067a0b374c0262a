"Where Fashion-MNIST comes from: the Hub, the local HF cache, or the bundled sample, and what happens offline."
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import miniai.datasets as mds
from miniai.datasets import (FASHION_CLASSES, HubUnreachableError, TensorDL, fashion_dls, fashion_mnist_arrays,
                             load_fashion_mnist, sample_path)

CLOSED_PORT = 'http://127.0.0.1:9'  # nothing listens on the "discard" port: connections are refused at once
UNROUTABLE = 'http://192.0.2.1'     # TEST-NET-1: never routed, so a connection either fails or hangs until a timeout
SCRUBBED = ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_ENDPOINT', 'MINIAI_DATA')
TIMEOUT = 120  # generous: only there so a hang fails the test instead of blocking the suite


def run_python(code, tmp_path, **env):
    "Run `code` in a fresh interpreter with the HF variables scrubbed, an empty HF cache, and `env` added."
    full_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    full_env.update(HF_HOME=str(tmp_path/'hf'), HF_DATASETS_CACHE=str(tmp_path/'hf'/'datasets'), **env)
    return subprocess.run([sys.executable, '-c', code], env=full_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT)


def notices(stderr):
    return [line for line in stderr.splitlines() if line.startswith('miniai:')]


# The subprocess counts calls to `datasets.load_dataset`: with an empty cache and no Hub, 'auto' must go straight to
# the sample instead of entering load_dataset's ~23 s of retries.
AUTO_CODE = '''
import datasets
calls = []
real_load_dataset = datasets.load_dataset
def counting_load_dataset(*args, **kwargs):
    calls.append(args)
    return real_load_dataset(*args, **kwargs)
datasets.load_dataset = counting_load_dataset
from miniai.datasets import load_fashion_mnist
dd = load_fashion_mnist('auto')
print(dd['train'].num_rows, dd['test'].num_rows, len(calls))
'''

def test_auto_falls_back_to_sample_when_hub_unreachable(tmp_path):
    "The whole story in a fresh interpreter with a scrubbed environment: one notice, the sample, no load_dataset."
    res = run_python(AUTO_CODE, tmp_path, HF_ENDPOINT=CLOSED_PORT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ['7226', '1000', '0']
    lines = notices(res.stderr)
    assert len(lines) == 1, res.stderr
    assert 'Hub unreachable' in lines[0] and 'bundled Fashion-MNIST sample (8,226 real images)' in lines[0]


@pytest.fixture
def empty_hf(tmp_path, monkeypatch):
    "An empty HF datasets cache, no offline variables, and no converted Hub arrays left from other tests."
    for k in SCRUBBED: monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path/'datasets'))
    monkeypatch.setattr(mds, '_hub_arrays', {})
    return tmp_path/'datasets'


def no_network(monkeypatch):
    "Make every way of opening a connection fail; returns the list of attempts."
    tried = []
    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError('network disabled by the test')
    for name in ('getaddrinfo', 'create_connection'): monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    return tried


@pytest.fixture
def no_load_dataset(monkeypatch):
    "Fail the test if `datasets.load_dataset` (slow to give up offline) is called."
    import datasets
    def refuse(*args, **kwargs): raise AssertionError(f'load_dataset{args} should not have been called')
    monkeypatch.setattr(datasets, 'load_dataset', refuse)


@pytest.mark.parametrize('env, why', [({'HF_ENDPOINT': UNROUTABLE}, 'Hub unreachable (192.0.2.1)'),
                                      ({'HF_DATASETS_OFFLINE': '1'}, 'offline mode is on'),
                                      ({'HF_HUB_OFFLINE': 'true'}, 'offline mode is on')])
def test_auto_falls_back_without_load_dataset(empty_hf, no_load_dataset, monkeypatch, capsys, env, why):
    for k, v in env.items(): monkeypatch.setenv(k, v)
    arrays = fashion_mnist_arrays('auto')
    assert [len(arrays[k][0]) for k in ('train', 'valid')] == [7226, 1000]
    lines = notices(capsys.readouterr().err)
    assert len(lines) == 1 and why in lines[0] and 'bundled Fashion-MNIST sample (8,226 real images)' in lines[0]


def test_env_sample_never_touches_network(empty_hf, no_load_dataset, monkeypatch, capsys):
    tried = no_network(monkeypatch)
    monkeypatch.setenv('MINIAI_DATA', 'sample')
    monkeypatch.setenv('HF_ENDPOINT', CLOSED_PORT)
    dd = load_fashion_mnist()
    arrays = fashion_mnist_arrays()
    dls = fashion_dls(64)
    assert (dd['train'].num_rows, len(arrays['valid'][0]), len(dls.valid)) == (7226, 1000, 8)
    assert tried == []
    assert notices(capsys.readouterr().err) == []


def test_env_var_bogus_source(monkeypatch):
    monkeypatch.setenv('MINIAI_DATA', 'nope')
    with pytest.raises(ValueError, match="MINIAI_DATA.*'auto', 'hub', 'sample'"): load_fashion_mnist()
    with pytest.raises(ValueError, match="'bogus'"): fashion_mnist_arrays('bogus')


@pytest.mark.parametrize('env', [{'HF_DATASETS_OFFLINE': '1'}, {'HF_HUB_OFFLINE': '1'}, {'HF_ENDPOINT': CLOSED_PORT}])
def test_hub_offline_raises_clear_error(empty_hf, monkeypatch, env):
    for k, v in env.items(): monkeypatch.setenv(k, v)
    for load in (load_fashion_mnist, fashion_mnist_arrays):
        with pytest.raises(HubUnreachableError) as e: load('hub')
        assert isinstance(e.value, ConnectionError)
        msg = str(e.value)
        assert "source='sample'" in msg and 'MINIAI_DATA=sample' in msg and 'offline' in msg
        assert ('offline mode is on' in msg) if 'HF_ENDPOINT' not in env else ('Hub unreachable' in msg)


def fake_hub_cache(cache, n_train=40, n_test=10):
    """Write what `load_dataset('zalando-datasets/fashion_mnist')` leaves in the `datasets` cache, from the sample.

    Mirrors the cache layout `datasets` uses for Hub datasets: <namespace>___<name>/<config>/<version>/<commit>/."""
    from datasets import Dataset
    from datasets.packaged_modules.parquet.parquet import Parquet
    arrays = mds._sample_arrays()
    work = cache.parent/'fake_hub_work'
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (('train', n_train), ('test', n_test)):
        x, y = arrays[split]
        files[split] = str(work/f'{split}.parquet')
        Dataset.from_dict({'image': list(x[:n]), 'label': y[:n]},
                          features=mds._fmnist_features()).to_parquet(files[split])
    builder = Parquet(cache_dir=str(work/'built'), dataset_name='fashion_mnist', config_name='fashion_mnist',
                      data_files=files, features=mds._fmnist_features())
    builder.download_and_prepare()
    built = next((work/'built'/'fashion_mnist').glob('*/0.0.0'))
    dst = cache/'zalando-datasets___fashion_mnist'/'fashion_mnist'/'0.0.0'/'0123456789abcdef'
    dst.mkdir(parents=True)
    for f in built.glob('*.arrow'): shutil.copy(f, dst/f.name)
    info = json.loads((built/'dataset_info.json').read_text())
    info['config_name'] = 'fashion_mnist'
    (dst/'dataset_info.json').write_text(json.dumps(info))


def test_cache_is_used_without_network(empty_hf, monkeypatch, capsys):
    import datasets.config, huggingface_hub.constants
    fake_hub_cache(empty_hf)
    capsys.readouterr()
    tried = no_network(monkeypatch)
    offline_flags = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE

    dd = load_fashion_mnist('auto')
    assert (dd['train'].num_rows, dd['test'].num_rows) == (40, 10)
    assert dd['train'].features['label'].names == FASHION_CLASSES
    assert notices(capsys.readouterr().err) == ['miniai: using Fashion-MNIST from the local Hugging Face cache']

    arrays = fashion_mnist_arrays('hub')  # converted from the cached PIL images
    with np.load(sample_path()) as npz: images, labels = npz['images'], npz['labels']
    np.testing.assert_array_equal(arrays['train'][0].numpy(), images[:40])
    np.testing.assert_array_equal(arrays['valid'][1].numpy(), labels[-1000:][:10])
    assert tried == []
    # The cache was read in offline mode, switched on only for that call.
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == offline_flags


def test_hub_reads_cache_in_offline_mode(empty_hf, monkeypatch):
    fake_hub_cache(empty_hf, n_train=8, n_test=4)
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    dd = load_fashion_mnist('hub')
    assert (dd['train'].num_rows, dd['test'].num_rows) == (8, 4)


def strict_index_select(monkeypatch):
    "Make index_select refuse an index on another device, as CUDA does (the CPU and 'meta' don't)."
    real = torch.Tensor.index_select
    def index_select(t, dim, idx):
        if idx.device != t.device: raise RuntimeError(f'index on {idx.device}, data on {t.device}')
        return real(t, dim, idx)
    monkeypatch.setattr(torch.Tensor, 'index_select', index_select)


def test_tensordl_indexes_on_the_data_device(monkeypatch):
    "Data kept on an accelerator ('meta' stands in for cuda here) gets its indices there, shuffled or not."
    strict_index_select(monkeypatch)
    x, y = torch.zeros(10, 2, 2, dtype=torch.uint8, device='meta'), torch.arange(10)
    for shuffle in (False, True):
        batches = list(TensorDL(x, y, bs=4, shuffle=shuffle, seed=0))
        assert ([(xb.device.type, yb.device.type, len(yb)) for xb, yb in batches]
                == [('meta', 'meta', n) for n in (4, 4, 2)])


def test_tensordl_pins_cpu_batches_when_cuda_is_there(monkeypatch):
    "With CUDA, CPU batches come pinned, so DeviceCB(non_blocking=True) overlaps the copy; pin_memory=False opts out."
    pinned = []
    def pin_memory(t):
        pinned.append(t.shape)
        return t
    monkeypatch.setattr(torch.Tensor, 'pin_memory', pin_memory)
    x, y = torch.zeros(5, 2, 2, dtype=torch.uint8), torch.arange(5)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    list(TensorDL(x, y, bs=4))
    assert pinned == []    # no GPU: nothing to gain
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    list(TensorDL(x, y, bs=4))
    assert pinned == [(4, 1, 2, 2), (4,), (1, 1, 2, 2), (1,)]
    pinned.clear()
    list(TensorDL(x, y, bs=4, pin_memory=False))
    list(TensorDL(x.to('meta'), y, bs=4))    # data already on a device: nothing to pin
    assert pinned == []
