"""Fixtures and helpers shared by the test files."""

import ast
import functools
import gc
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import models
from data import FASHION_MEAN, FASHION_STD, load_fashion_mnist
from tools import beton
from tools.check_gpu import write_idx

FASHION = '/usr/share/datasets/fashion-mnist'  # the real data (make data)


@functools.cache
def parse_file(path):
    """ast.parse of a file, once, with the collector off: CPython 3.11.7 keeps the AST builder's recursion
    depth in state shared by all threads, and finalizers a collection runs mid-build can hand the GIL to
    another thread building one (SystemError: AST constructor recursion depth mismatch; fixed in 3.12)."""
    with open(path) as f:
        source = f.read()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SWINB = 'swin_base_patch4_window7_224'  # the paper's headline model (timm)
CPU = torch.device('cpu')


@pytest.fixture
def ffcv_importable():
    if data.ffcv_error():
        pytest.skip(f'FFCV: {data.ffcv_error()}')


# asked when such a test runs, not when this file is imported: importing FFCV compiles numba code for
# seconds, which every rank a test spawns (it imports the test's module, hence this one) would pay again
needs_ffcv = pytest.mark.usefixtures('ffcv_importable')


def one_thread_env(**extra):
    """os.environ with one OpenMP thread, for the commands the tests start: the suite's two workers fill
    CI's two cores, and a child's second thread spins at every barrier against the other worker
    (2-4x the CPU seconds; docs/speed.md, the test suite)."""
    return dict(os.environ, OMP_NUM_THREADS='1', **extra)


def run(args, timeout=600, env=None, **kw):
    """python ARGS in the repository, as a user runs it (env: one_thread_env() unless given)."""
    env = one_thread_env() if env is None else env
    return subprocess.run(
        [sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env, **kw
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


# ---------------------------------------------------------------- an ImageFolder of real photos

def skimage_photo(name):
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """3 classes of real photos in several sizes (one above max_side, one below 224 px), RGB, gray,
    CMYK, RGBA PNG named .JPEG, and one truncated JPEG. -> (root, {split: [(path, label, ok)]})"""
    root = tmp_path_factory.mktemp('folder')
    rgb = ['astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry', 'hubble_deep_field']
    gray = ['camera', 'coins', 'moon']
    files = {}
    for split in ('train', 'val'):
        files[split] = []
        for c, cls in enumerate(['apple', 'bird', 'car']):
            os.makedirs(root / split / cls)
            for i in range(3):
                k = c * 3 + i + (split == 'val')
                name = (rgb + gray)[k % 9]
                im = skimage_photo(name)
                w, h = [(640, 480), (333, 500), (200, 150), im.size][k % 4]
                im = im.resize((w, h), Image.BICUBIC)
                path = root / split / cls / f'{name}_{i}.JPEG'
                if (c, i) == (1, 1):
                    im.convert('CMYK').save(path, 'JPEG', quality=95)
                elif (c, i) == (2, 1):  # a PNG with alpha under a .JPEG name, as ImageNet has one
                    im.convert('RGBA').save(path, 'PNG')
                else:
                    im.save(path, 'JPEG', quality=95)
                files[split].append((str(path), c, True))
        bad = root / split / 'bird' / 'broken.JPEG'
        full = (root / split / 'apple').iterdir().__next__().read_bytes()
        bad.write_bytes(full[: len(full) // 2])
        files[split] = sorted(
            files[split] + [(str(bad), 1, False)], key=lambda f: (f[1], f[0])
        )  # ImageFolder's order
    return root, files


@pytest.fixture(scope='module')
def betons(tree, tmp_path_factory):
    if data.ffcv_error():
        pytest.skip(f'FFCV: {data.ffcv_error()}')
    out = tmp_path_factory.mktemp('beton')
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):  # all-JPEG (compress=1): the test bounds JPEG loss, the worst case
        counts = beton.write_beton(str(tree[0]), str(out), max_side=500, quality=90, compress=1.0, workers=2)
    return out, counts, err.getvalue()


def collect(loader):
    """Every batch, copied: FFCV reuses its buffers, a batch is valid until the next is drawn."""
    xs, ys = zip(*((x.clone(), y) for x, y in loader))
    return torch.cat(xs), torch.cat(ys)


def check_batch(x, y, res, classes=3):
    assert x.shape[1:] == (3, res, res) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.05  # real pixels, not zeros
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert ((0 <= y) & (y < classes)).all()
