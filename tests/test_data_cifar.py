"""CIFAR-10's python version on small files in its exact format (pickled dicts with byte-string keys, N x 3072
uint8 channel-major): the loaders give the pickled arrays, the padded crops are shifted copies, bad files are
one line, and a run trains and evaluates end to end under RobustBench's protocol."""

import functools
import hashlib
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

import attack
import augment as A
import checkpoint as CK
import config as C
import data as D
import evaluate
import train
from tests.conftest import CPU, HERE, needs_ffcv, run

SIZES = {**{f'data_batch_{i}': 120 for i in range(1, 6)}, 'test_batch': 200}


def write_batch(path, n, seed):
    """A batch file as the release pickles it: random images and labels, with its other two keys."""
    rng = np.random.default_rng(seed)
    batch = {b'batch_label': os.path.basename(path).encode(), b'labels': rng.integers(0, 10, n).tolist(),
             b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b'filenames': [f'img_{i}.png'.encode() for i in range(n)]}
    with open(path, 'wb') as f:
        pickle.dump(batch, f, protocol=2)
    return batch


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """tmp_path/cifar-10-batches-py with SIZES images per file, batches.meta; the FFCV cache under tmp_path.
    -> (its parent folder, {file: its dict})"""
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    batches = {name: write_batch(folder / name, n, i) for i, (name, n) in enumerate(SIZES.items())}
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [c.encode() for c in D.CIFAR_CLASSES], b'num_vis': 3072}, f, protocol=2)
    monkeypatch.setattr(D, 'CACHE', str(tmp_path / 'cache'))
    return str(tmp_path), batches


def pickled(batches, names):
    """The files' images as N x 3 x 32 x 32 uint8 and their labels, in file order."""
    x = np.concatenate([batches[n][b'data'] for n in names]).reshape(-1, 3, 32, 32)
    return torch.from_numpy(x), torch.tensor(sum((batches[n][b'labels'] for n in names), []))


def images(loader):
    """-> all its images as uint8, labels (copies: FFCV reuses its buffers)."""
    xs, ys = zip(*((x.mul(255).round().to(torch.uint8), y.clone()) for x, y in loader))
    return torch.cat(xs), torch.cat(ys)


def test_kind_shape_and_identity_without_loading(cifar, capfd):
    root, _ = cifar
    inner = os.path.join(root, 'cifar-10-batches-py')
    assert C.data_kind(root) == C.data_kind(inner) == 'cifar' and C.cifar_dir(root) == inner
    assert C.data_kind(os.path.dirname(root)) == 'fashion'  # nothing of CIFAR-10 there
    cfg = C.Config(data=root)
    assert D.data_info(cfg) == dict(in_ch=3, num_classes=10, img_size=32, mean=D.CIFAR_MEAN, std=D.CIFAR_STD)
    ident = CK.identity(root)
    assert ident['kind'] == 'cifar' and ident['size'] == 600 and D.val_size(root) == 200
    assert ident['classes'] == list(D.CIFAR_CLASSES)
    assert CK.identity(inner)['fingerprint'] == ident['fingerprint']
    # the parent is not the recipe's ImageNet default: CIFAR-10 gets the plain defaults
    assert C.parse_config([f'--data={root}']).recipe == ''


def test_loaders_give_the_pickled_arrays(cifar, capfd):
    """In memory and through the .beton cache (FFCV), exactly: test images in order, every training image."""
    root, batches = cifar
    x_test, y_test = pickled(batches, ['test_batch'])
    x_train, y_train = pickled(batches, C.CIFAR_FILES[:5])
    cfg = C.Config(data=root, loader='torchvision', eval_n=50, batch_size=64, workers=1)
    _, val, robust_val, info = D.make_loaders(cfg, 0, 1, CPU)
    assert info == D.data_info(cfg)
    for loader, n in ((val, 200), (robust_val, 50)):
        x, y = images(loader)
        assert torch.equal(x, x_test[:n]) and torch.equal(y, y_test[:n])
    if D.ffcv_error() is None:
        _, val, _, _ = D.make_loaders(C.Config(data=root, loader='ffcv', workers=1), 0, 1, CPU)
        x, y = images(val)
        assert torch.equal(x, x_test) and torch.equal(y, y_test)
        stored = A.ffcv_loader(os.path.join(D.small_cache(root, 'cifar'), 'train.beton'), 100, CPU, False,
                               crop=False, workers=1)
        x, y = images(stored)
        assert torch.equal(x, x_train) and torch.equal(y, y_train)


def test_checksums_warn_once_unless_official(cifar, capfd, monkeypatch):
    root, _ = cifar
    D.cifar_read.cache_clear()
    CK.identity(root), D.val_size(root)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('warning: ') and 'not the official CIFAR-10 release' in err[0]
    assert 'a subset or a modified copy' in err[0] and 'data_batch_1' in err[0], err
    files = [os.path.join(root, 'cifar-10-batches-py', f) for f in C.CIFAR_FILES]
    official = {os.path.basename(p): hashlib.md5(open(p, 'rb').read()).hexdigest() for p in files}
    monkeypatch.setattr(D, 'CIFAR_MD5', official)
    D.cifar_read.cache_clear()
    CK.identity(root)
    assert not capfd.readouterr().err


def test_pad_crop_is_a_shifted_copy_with_zeros():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no zero pixel: zeros are the padding
    shifts = set()
    for index in range(40):
        out = A.pad_crop(image, 4, 7, 1, index)
        assert np.array_equal(out, A.pad_crop(image, 4, 7, 1, index)) and out.shape == image.shape
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if np.array_equal(out, shifted(image, dy, dx))]
        assert len(found) == 1, index
        shifts.add(found[0])
    assert len(shifts) > 20  # offsets spread over the 81


def shifted(image, dy, dx):
    """out[r, c] = image[r + dy, c + dx], zero outside the image."""
    out, h, w = np.zeros_like(image), *image.shape[:2]
    out[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        image[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def test_training_batches_flip_and_pad_crop_reproducibly(cifar):
    """The in-memory loader: each image flipped or not, then a padded crop (then RandAugment); the same seed
    the same batches."""
    root, batches = cifar
    x_train, _ = pickled(batches, C.CIFAR_FILES[:5])
    make = lambda seed: D.TensorLoader(x_train, torch.zeros(600), 100, CPU, True, seed=seed, pad=4)
    a, b, other = next(iter(make(3))), next(iter(make(3))), next(iter(make(4)))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], other[0])
    order = torch.randperm(600, generator=torch.Generator().manual_seed(3 * 1000))[:100]  # TensorLoader's
    x = a[0].mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    flips = 0
    for out, i in zip(x, order.tolist()):
        src = x_train[i].permute(1, 2, 0).numpy()
        flipped = A.rand_u32(3, 0, i, A.FLIP) < 2 ** 31
        flips += flipped
        src = np.ascontiguousarray(src[:, ::-1] if flipped else src)
        assert np.array_equal(out, A.pad_crop(src, 4, 3, 0, i))
    assert 20 < flips < 80
    ra = D.randaug_transform('rand-m9-mstd0.5-inc1', 32, D.CIFAR_MEAN)  # the authors' RandAugment, on RGB
    make = lambda: D.TensorLoader(x_train[:32], torch.zeros(32), 32, CPU, True, seed=3, randaug=ra, pad=4)
    c, d = next(iter(make())), next(iter(make()))
    plain = next(iter(D.TensorLoader(x_train[:32], torch.zeros(32), 32, CPU, True, seed=3, pad=4)))
    assert torch.equal(c[0], d[0]) and (c[0] != plain[0]).flatten(1).any(1).float().mean() >= 0.5


@needs_ffcv
def test_ffcv_training_batches_are_the_same_rule(cifar, tmp_path):
    """FFCV's training loader (flip, then the padded crop, as the in-memory one): images stored with their
    index as label, so each can be checked against the rule."""
    root, batches = cifar
    x_train, _ = pickled(batches, C.CIFAR_FILES[:5])
    path = str(tmp_path / 'indexed.beton')
    D.write_split(D.gray_as_rgb(x_train, torch.arange(600)), path, workers=1, write_mode='raw')
    loader = A.ffcv_loader(path, 100, CPU, True, crop=False, seed=3, workers=1, pad=4)
    for x, index in loader:
        x = x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for out, i in zip(x, index.tolist()):
            src = x_train[i].permute(1, 2, 0).numpy()
            src = np.ascontiguousarray(src[:, ::-1] if A.rand_u32(3, 0, i, A.FLIP) < 2 ** 31 else src)
            assert np.array_equal(out, A.pad_crop(src, 4, 3, 0, i)), i


def one_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_bad_files_are_one_line_naming_the_file(cifar, tmp_path, capsys):
    root, _ = cifar
    folder = os.path.join(root, 'cifar-10-batches-py')
    argv = [f'--data={root}', f'--out={tmp_path / "run"}', '--workers=1', '--loader=torchvision']
    os.rename(os.path.join(folder, 'test_batch'), os.path.join(folder, 'test'))
    one_error(C.cli(train.main, argv), capsys.readouterr().err, os.path.join(folder, 'test_batch'), 'missing')
    os.rename(os.path.join(folder, 'test'), os.path.join(folder, 'test_batch'))
    cases = [(b'not a pickle\n', 'UnpicklingError'), (pickle.dumps([1, 2]), "b'data'"),
             (pickle.dumps({b'data': np.zeros((5, 1024), np.uint8), b'labels': [0] * 5}), '(5, 1024)'),
             (pickle.dumps({b'data': np.zeros((5, 3072), np.float32), b'labels': [0] * 5}), 'float32'),
             (pickle.dumps({b'data': np.zeros((5, 3072), np.uint8), b'labels': [0, 1, 2, 3, 10]}), 'in 0..9')]
    for content, why in cases:
        with open(os.path.join(folder, 'data_batch_3'), 'wb') as f:
            f.write(content)
        one_error(C.cli(train.main, argv), capsys.readouterr().err, os.path.join(folder, 'data_batch_3'), why)


def test_trains_and_evaluates_under_robustbenchs_protocol(cifar, tmp_path, monkeypatch, capsys):
    """train.py with the cifar_standard recipe (padded crops, erasing, Mixup, CutMix, 8/255) on a small model,
    the files in memory, one epoch; then evaluate.py with CIFAR-10's
    defaults (8/255, AutoAttack; its first component alone, in seconds) on 16 images: its header names the
    protocol, kept but for the number of images; `make eval EPS=...` passes the budgets through."""
    root, _ = cifar
    monkeypatch.setattr(attack, 'autoattack', functools.partial(attack.autoattack, components=['apgd-ce']))
    out = str(tmp_path / 'run')
    r = run(['train.py', f'--data={root}', '--recipe=cifar_standard', '--model=resnet_demo_pool',
             '--epochs=1', '--batch_size=200', '--eval_n=20', '--eval_steps=2', f'--out={out}', '--workers=1',
             '--loader=torchvision', '--randaug='])  # RandAugment on CIFAR-10: the in-memory test above
    assert r.returncode == 0 and 'final: clean' in r.stdout + r.stderr, r.stderr[-3000:]
    assert 'not the official CIFAR-10 release' in r.stderr, r.stderr[-2000:]
    ckpt = os.path.join(out, 'ckpt.pt')
    assert C.cli(evaluate.main, ['--ckpt', ckpt, '--n', '16', '--steps', '2', '--no-checks']) is None
    out = capsys.readouterr().out.splitlines()
    head = next(line for line in out if line.startswith(f'{ckpt}: '))  # after AutoAttack's progress
    assert "| not RobustBench's protocol (AutoAttack, L-inf 8/255, 10000 images)" in head, head
    assert '| 16 images |' in head and any(line.startswith('autoattack 8/255 ') for line in out), out
    args = evaluate.resolve(evaluate.parse_args(['--ckpt', ckpt]), CK.load_checkpoint(ckpt))
    assert args.eps == ['8/255'] and args.n == 10000 and args.autoattack
    make = ['make', '-n', 'eval', f'CKPT={ckpt}', 'EPS=8/255 4/255']  # -n: the command, not run
    r = subprocess.run(make, cwd=HERE, capture_output=True, text=True)
    assert f'evaluate.py --ckpt={ckpt} --eps 8/255 4/255' in r.stdout, r.stdout + r.stderr
