"""Fixtures shared by the test files."""

import pytest
import torch

from data import load_fashion_mnist, write_idx

FASHION = '/usr/share/datasets/fashion-mnist'


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A 512/256-image slice of the real Fashion-MNIST, in the same IDX format."""
    (xtr, ytr), (xte, yte) = load_fashion_mnist(FASHION)
    d = tmp_path_factory.mktemp('fashion')
    for name, t in [
        ('train-images-idx3-ubyte', xtr[:512, 0]),
        ('train-labels-idx1-ubyte', ytr[:512]),
        ('t10k-images-idx3-ubyte', xte[:256, 0]),
        ('t10k-labels-idx1-ubyte', yte[:256]),
    ]:
        write_idx(d / f'{name}.gz', t.to(torch.uint8))
    return str(d)


@pytest.fixture
def one_thread():
    """Tiny linear problems: extra threads only add synchronization (20x slower on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def pretrained_weights_cached(monkeypatch):
    """In-process, recipes that start from timm's weights parse as if they were downloaded (there is
    no network here); tests/test_eval_faults.py runs the real check in subprocesses."""
    import config

    monkeypatch.setattr(config, 'pretrained_missing', lambda name: None)
