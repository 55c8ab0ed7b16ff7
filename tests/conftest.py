"""Fixtures and helpers shared by the test files."""

import os
import subprocess
import sys

import pytest
import torch

import models
from data import FASHION_MEAN, FASHION_STD, load_fashion_mnist, write_idx

FASHION = '/usr/share/datasets/fashion-mnist'  # the real data (make data)
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SWINB = 'swin_base_patch4_window7_224'  # the paper's headline model (timm)


def run(args, timeout=600, **kw):
    """python ARGS in the repository, as a user runs it."""
    return subprocess.run(
        [sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout, **kw
    )


def demo_model(act='gelu', seed=0, **kw):
    """The demo's resnet_demo for Fashion-MNIST, seeded."""
    torch.manual_seed(seed)
    fashion = dict(in_ch=1, num_classes=10, mean=FASHION_MEAN, std=FASHION_STD)
    return models.build_model('resnet_demo', act, **fashion, **kw)


def rel(a, b):
    """Relative L2 error of a against b."""
    return ((a - b).norm() / b.norm()).item()


def param_grad(model, fn, x, y, *args, **kw):
    """-> (loss, flat parameter gradient) of one step; x is made a leaf outside fn, as in train()."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # EdgeReg samples a class: the same one for every call
    loss, _ = fn(model, x.clone().requires_grad_(), y, *args, **kw)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


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
    no network here); tests/test_evaluate_faults.py runs the real check in subprocesses."""
    import config

    monkeypatch.setattr(config, 'pretrained_missing', lambda name: None)


def fake_hub(cache, name, seed=0):
    """Random weights for timm's default pretrained tag of name, in the Hugging Face cache layout,
    where timm's loader finds them with HF_HUB_OFFLINE=1. -> the state_dict written"""
    import safetensors.torch
    import timm

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    with torch.device('meta'):
        shapes = timm.create_model(name).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: (torch.ones(v.shape) if k.endswith('running_var') else 0.02 * torch.randn(v.shape, generator=g))
        if v.is_floating_point()
        else torch.zeros(v.shape, dtype=v.dtype)
        for k, v in shapes.items()
    }
    folder = os.path.join(cache, f'models--{repo.replace("/", "--")}')
    commit = 'c0ffee' * 6 + 'c0ff'
    os.makedirs(os.path.join(folder, 'refs'), exist_ok=True)
    os.makedirs(os.path.join(folder, 'snapshots', commit), exist_ok=True)
    with open(os.path.join(folder, 'refs', 'main'), 'w') as f:
        f.write(commit)
    safetensors.torch.save_file(sd, os.path.join(folder, 'snapshots', commit, 'model.safetensors'))
    return sd


def offline_env(cache):
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1')
