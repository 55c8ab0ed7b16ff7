"""The data path: ImageFolder of real photos -> .beton -> batches, FFCV and torchvision (data.py,
tools/beton.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import augment as A
import checkpoint as CK
import config as C
import data as D
import models as M
from tests.conftest import CPU, check_batch, collect, needs_ffcv
from tools import beton


def broken(files):
    return next(p for p, _, ok in files if not ok)


def reference(path, res=224):
    """The ImageNet evaluation crop on the original file: torchvision's Resize(256), then the central
    224 square, its offset rounded down as FFCV does (torchvision's CenterCrop rounds to even: a 1 px
    shift, which alone costs ~10 dB on a detailed photo)."""
    from torchvision.transforms.functional import resize

    im = resize(Image.open(path).convert('RGB'), round(res / 0.875))
    left, top = (im.width - res) // 2, (im.height - res) // 2
    return (
        torch.from_numpy(np.array(im.crop((left, top, left + res, top + res)))).permute(2, 0, 1).float() / 255
    )


def psnr(a, b):
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()


@needs_ffcv
def test_writer_counts_skips_and_labels(betons, tree):
    out, counts, err = betons
    _, files = tree
    assert counts == {'train': (9, 1), 'val': (9, 1)}
    for split in ('train', 'val'):
        assert f'skipping {broken(files[split])}' in err  # the broken file, by name
        with open(out / f'{split}_files.txt') as f:
            listed = f.read().split()
        assert listed == [os.path.relpath(p, tree[0] / split) for p, _, ok in files[split] if ok]
    assert not list(out.glob('*.tmp'))
    from ffcv.reader import Reader

    stored = {
        split: Reader(str(out / f'{split}.beton')).metadata['f0'] for split in ('train', 'val')
    }  # f0: image
    train_sizes = set(zip(stored['train']['width'].tolist(), stored['train']['height'].tolist()))
    assert max(map(max, train_sizes)) <= 500 and (500, 375) in train_sizes  # 640x480 shrunk, not cut
    assert (
        np.minimum(stored['val']['height'], stored['val']['width']) == 256
    ).all()  # Resize(256), 150 px ones too
    x, y = collect(A.ffcv_loader(str(out / 'val.beton'), 4, CPU, train=False))
    assert y.tolist() == [c for _, c, ok in files['val'] if ok]  # sorted-class labels, in order
    check_batch(x, y, 224)


@needs_ffcv
def test_val_matches_pil_center_crop(betons, tree):
    x, _ = collect(A.ffcv_loader(str(betons[0] / 'val.beton'), 4, CPU, train=False))
    good = [p for p, _, ok in tree[1]['val'] if ok]
    scores = [psnr(a, reference(p)) for a, p in zip(x, good)]
    assert min(scores) >= 30, scores  # JPEG q90 only; a wrong crop, scale or channel order is < 20 dB


def test_torchvision_fallback(tree, capfd):
    root, files = tree
    x, y = collect(A.torchvision_loader(D.list_images(str(root / 'val'))[1], 4, CPU, train=False, workers=0))
    err = capfd.readouterr().err
    assert f'cannot decode {broken(files["val"])}' in err
    assert len(y) == len(files['val'])  # the broken file's slot holds the next image
    assert [v for v, (_, _, ok) in zip(y.tolist(), files['val']) if ok] == [
        c for _, c, ok in files['val'] if ok
    ]
    good = [(a, p) for a, (p, _, ok) in zip(x, files['val']) if ok]
    assert min(psnr(a, reference(p)) for a, p in good) >= 30
    check_batch(x, y, 224)
    train = D.list_images(str(root / 'train'))[1]
    x, y = next(iter(A.torchvision_loader(train, 4, CPU, train=True, res=160, workers=0)))
    check_batch(x, y, 160)


# ---------------------------------------------------------------- two ranks, one epoch each sample once

N_IDS = 40


@pytest.fixture(scope='module')
def id_folder(tmp_path_factory):
    """Images whose pixel value is their id: any crop of a flat image is that value."""
    root = tmp_path_factory.mktemp('ids')
    for split in ('train', 'val'):
        for i in range(N_IDS):
            os.makedirs(root / split / f'c{i % 2}', exist_ok=True)
            Image.new('RGB', (48, 40), (6 * i,) * 3).save(root / split / f'c{i % 2}' / f'{i:02d}.png')
    if not D.ffcv_error():
        beton.write_beton(str(root), str(root / 'beton'), compress=0, workers=2)
    return root


def _rank(rank, root, pg_file, out):
    dist.init_process_group('gloo', init_method=f'file://{pg_file}', rank=rank, world_size=2)
    loaders = {
        'torchvision': A.torchvision_loader(
            D.list_images(f'{root}/train')[1], 5, CPU, True, 32, rank, 2, seed=3, workers=0
        )
    }
    if not D.ffcv_error():
        # one thread: FFCV compiles a parallel pipeline for seconds more, and the order does not depend on
        # it (test_augment: the same batches for 1 and 2 threads)
        loaders['ffcv'] = A.ffcv_loader(
            f'{root}/beton/train.beton', 5, CPU, True, 32, rank=rank, world=2, seed=3, workers=1
        )
    seen = {}
    for name, loader in loaders.items():
        for epoch in (0, 1, 0):
            loader.set_epoch(epoch)
            ids = [round(v) for x, _ in loader for v in (x.mean((1, 2, 3)) * 255 / 6).tolist()]
            seen.setdefault(name, []).append(ids)
    torch.save(seen, f'{out}/{rank}.pt')
    dist.destroy_process_group()


def test_two_ranks_each_sample_once_per_epoch(id_folder, tmp_path):
    mp.spawn(_rank, (str(id_folder), str(tmp_path / 'pg'), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'{r}.pt') for r in range(2)]
    assert set(ranks[0]) == ({'torchvision'} if D.ffcv_error() else {'torchvision', 'ffcv'})
    for name in ranks[0]:
        for epoch in range(3):
            a, b = ranks[0][name][epoch], ranks[1][name][epoch]
            assert len(a) == len(b) == N_IDS // 2 and sorted(a + b) == list(range(N_IDS)), (name, epoch)
        assert ranks[0][name][0] != ranks[0][name][1]  # a new order every epoch
        assert ranks[0][name][0] == ranks[0][name][2]  # and the same one again for the same seed + epoch


def _write_same_file(barrier, path, images, labels):
    barrier.wait()
    D.write_split(D.gray_as_rgb(images, labels), path, workers=1, write_mode='raw')


@needs_ffcv
def test_two_writers_of_one_beton(tmp_path):
    """The first rank of every node writes the demo's cache; on a shared file system they race for
    the same file. Whoever renames last, the .beton is whole and no temporary file is left."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4000, 1, 28, 28), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, 4000))
    ctx = mp.get_context('spawn')
    barrier, path = ctx.Barrier(2), str(tmp_path / 'train.beton')
    procs = [ctx.Process(target=_write_same_file, args=(barrier, path, images, labels)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)  # a clobbered writer can hang
        p.kill()
    assert [p.exitcode for p in procs] == [0, 0] and os.listdir(tmp_path) == ['train.beton']
    os.makedirs(tmp_path / 'alone')
    _write_same_file(ctx.Barrier(1), str(tmp_path / 'alone' / 'train.beton'), images, labels)
    assert (tmp_path / 'train.beton').read_bytes() == (tmp_path / 'alone' / 'train.beton').read_bytes()


# ---------------------------------------------------------------- the contract train.train uses


@needs_ffcv
def test_make_loaders_on_betons(betons):
    cfg = C.parse_config(
        [f'--data={betons[0]}', '--recipe=', '--batch_size=4', '--res=64', '--eval_n=5', '--workers=2']
    )
    train, val, robust_val, info = D.make_loaders(cfg, 0, 1, CPU)
    assert info == dict(in_ch=3, num_classes=3, img_size=64)  # the models' default normalization: ImageNet's
    assert sum(len(y) for _, y in val) == 9 and sum(len(y) for _, y in robust_val) == 5
    assert len(train) == 9 // 4  # drop_last
    train.set_epoch(0)
    check_batch(*next(iter(train)), 64)  # random-resized crop + flip


@pytest.mark.parametrize('loader', ['ffcv', 'torchvision'])
def test_mixup_and_cutmix_give_soft_labels(loader, tree, tmp_path_factory):
    """--mixup and --cutmix give soft labels that are convex combinations of two one-hot rows, and
    images still in [0,1] at --res (val too)."""
    if loader == 'ffcv':
        if D.ffcv_error():
            pytest.skip(f'FFCV: {D.ffcv_error()}')
        data = tmp_path_factory.mktemp('beton_rs')
        beton.write_beton(str(tree[0]), str(data), max_side=256, workers=2)
    else:
        data = tree[0]
    cfg = C.parse_config(
        [
            f'--data={data}',
            f'--loader={loader}',
            '--batch_size=4',
            '--res=64',
            '--epochs=4',
            '--mixup=0.8',
            '--cutmix=1.0',
            '--reprob=0',
            '--workers=2',
        ]
    )
    train, val, _, _ = D.make_loaders(cfg, 0, 1, CPU)
    for epoch in (0, 3):
        train.set_epoch(epoch)
        x, y = next(iter(train))
        assert x.shape[-1] == 64 and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))
        assert (y > 0).sum(1).max() <= 2 and (y.max(1).values >= 0.5 - 1e-6).all()
    assert next(iter(val))[0].shape[-1] == 64


def test_imagenet_recipe_unless_overridden(tree):
    """ImageNet-like data without --recipe: the paper's headline run (swinb_gradnorm), each value
    overridable; a --batch_size override rescales lr as the authors' rule (base lr x batch / 512)."""
    cfg = C.parse_config([f'--data={tree[0]}', '--batch_size=256'])
    assert (
        cfg.recipe,
        cfg.model,
        cfg.init,
        cfg.objective,
        cfg.lr,
        cfg.weight_decay,
        cfg.warmup_epochs,
        cfg.min_lr,
    ) == (
        'swinb_gradnorm',
        'swin_base_patch4_window7_224',
        'pretrained',
        'gradnorm',
        0.625e-3 * 256 / 512,
        0.05,
        5.0,
        1e-5,
    )
    assert (cfg.smoothing, cfg.ema, cfg.clip, cfg.ramp_epochs, cfg.eps, cfg.res) == (
        0.1,
        0.9998,
        0.5,
        5.0,
        4 / 255,
        224,
    )
    cfg = C.parse_config([f'--data={tree[0]}', '--lr=0.01', '--model=vit_small', '--init='])
    assert (cfg.lr, cfg.model, cfg.init) == (0.01, 'vit_small', '')
    assert (
        C.parse_config([]).model == 'resnet_demo_pool' and C.parse_config([]).recipe == ''
    )  # Fashion-MNIST: the demo
    assert (
        C.parse_config([f'--data={tree[0]}', '--recipe=']).model == 'resnet_demo_pool'
    )  # --recipe= : plain defaults
    assert (cfg.randaug, cfg.reprob, cfg.mixup, cfg.cutmix) == ('rand-m9-mstd0.5-inc1', 0.25, 0.8, 1.0)
    demo = C.parse_config([])  # Fashion-MNIST keeps the demo's defaults: no RandAugment, erasing or mixing
    assert (demo.model, demo.randaug, demo.reprob, demo.mixup, demo.cutmix) == (
        'resnet_demo_pool',
        '',
        0.0,
        0.0,
        0.0,
    )


def test_torchvision_resnet50_loads_strictly():
    import torchvision

    ours = M.build_model('resnet50', 'gelu')
    ours.load_state_dict(torchvision.models.resnet50().state_dict(), strict=True)
    assert sum(isinstance(m, torch.nn.GELU) for m in ours.modules()) > 0


def test_robustbench_subset():
    with open(D.ROBUSTBENCH_LIST) as f:
        wanted = f.read().split()
    assert len(wanted) == len(set(wanted)) == 5000
    names = sorted(wanted[:3] + ['n00000000/other.JPEG'])
    assert [names[i] for i in D.robustbench_indices(names, 3)] == wanted[:3]
    assert D.robustbench_indices(names, 4) is None  # the 4th listed file is not there


def test_fashion_mnist_through_ffcv_is_exact():
    if D.ffcv_error():
        pytest.skip(f'FFCV: {D.ffcv_error()}')
    cfg = C.parse_config(['--eval_n=700', '--workers=2'])
    train, val, robust_val, info = D.make_loaders(cfg, 0, 1, CPU)
    (xtr, _), (xte, yte) = D.load_fashion_mnist(cfg.data)
    x, y = collect(robust_val)
    assert (
        x.shape == (700, 1, 28, 28)
        and torch.equal((x * 255).round().byte(), xte[:700])
        and torch.equal(y, yte[:700])
    )
    train.set_epoch(0)
    x, y = next(iter(train))
    assert x.shape == (128, 1, 28, 28) and y.dtype == torch.int64 and len(train) == 60000 // 128


def test_without_ffcv_demo_still_loads_and_imagenet_says_what_to_install(tree):
    code = (
        'import sys; sys.modules["ffcv"] = None\n'
        'import torch, data, config\n'
        'cfg = config.parse_config(["--eval_n=10"])\n'
        'tr, va, rv, info = data.make_loaders(cfg, 0, 1, torch.device("cpu"))\n'
        'print(type(tr).__name__, sum(len(y) for _, y in rv))\n'
        f'cfg = config.parse_config(["--data={tree[0]}", "--init="])\n'
        'try:\n    data.make_loaders(cfg, 0, 1, torch.device("cpu"))\n'
        'except Exception as e:\n    print(type(e).__name__, e)\n'
    )
    r = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert r.returncode == 0, r.stderr
    assert 'TensorLoader 10' in r.stdout
    assert 'UserError FFCV is not importable' in r.stdout and 'libturbojpeg0-dev' in r.stdout
    assert '--loader=torchvision' in r.stdout


# ---------------------------------------------------------------- images read right; the cache checked


def test_16_bit_gray_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit PNG (PIL mode I;16) of a gradient reads as its 8-bit original, in load_rgb (the
    torchvision loader) and in tools/beton.py's reader, not as 255 wherever the 16-bit value is above 255."""
    g = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    Image.fromarray(g).save(tmp_path / 'g8.png')
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / 'g16.png')
    assert Image.open(tmp_path / 'g16.png').mode == 'I;16'
    want = np.asarray(A.load_rgb(tmp_path / 'g8.png'))
    assert np.array_equal(np.asarray(A.load_rgb(tmp_path / 'g16.png')), want) and want[0, -1, 0] == 255
    assert np.array_equal(beton._Photos([(str(tmp_path / 'g16.png'), 0)])[0][0], want)


def test_listing_follows_links_once(tmp_path, capfd):
    """Links to files and folders are followed; a loop, or a link to another class's folder, lists no
    image twice; a link out of the split is named."""
    pixels = np.zeros((4, 4, 3), np.uint8)
    for p in ('train/a/1.png', 'train/a/deep/2.png', 'train/b/3.png', 'elsewhere/4.png'):
        os.makedirs(tmp_path / os.path.dirname(p), exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / p)
    train = tmp_path / 'train'
    os.symlink(train / 'b', train / 'a' / 'to_b')  # another class's folder
    os.symlink('..', train / 'a' / 'deep' / 'loop')  # a loop
    os.symlink(tmp_path / 'elsewhere', train / 'a' / 'out')  # out of the split
    os.symlink(train / 'a' / '1.png', train / 'b' / '0.png')  # a link to a file
    classes, samples = D.list_images(str(train))
    assert classes == ['a', 'b']
    assert [(os.path.relpath(p, train), y) for p, y in samples] == [
        ('a/1.png', 0),
        ('a/deep/2.png', 0),
        ('a/out/4.png', 0),
        ('b/0.png', 1),
        ('b/3.png', 1),
    ]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('warning: ') and f'{train}/a/out links out' in err[0], err


@needs_ffcv
def test_beton_writer_takes_a_name_that_is_not_utf8(tmp_path):
    """tools.beton writes such a file as the torchvision loader reads it: the image, its name as its bytes."""
    pixels = np.full((16, 16, 3), 100, np.uint8)  # uniform: any resize or crop keeps it
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            os.makedirs(tmp_path / 'src' / split / c)
            name = os.path.join(os.fsencode(tmp_path / 'src' / split / c), b'caf\xe9.png')  # Latin-1
            Image.fromarray(pixels).save(name)
    beton.write_beton(str(tmp_path / 'src'), str(tmp_path / 'out'), compress=0, workers=1, val_side=0)
    assert (tmp_path / 'out' / 'val_files.txt').read_bytes() == b'a/caf\xe9.png\nb/caf\xe9.png\n'
    assert (tmp_path / 'out' / 'classes.txt').read_text() == 'a\nb\n'
    val = D.list_images(str(tmp_path / 'src' / 'val'))[1]
    tv = A.torchvision_loader(val, 2, CPU, False, res=16, workers=0)
    cfg = C.parse_config([f'--data={tmp_path / "out"}', '--recipe=', '--res=16', '--eval_n=2', '--workers=1'])
    x, y = collect(D.make_loaders(cfg, 0, 1, CPU)[2])
    assert torch.equal(x, collect(tv)[0]) and (x == 100 / 255).all() and y.tolist() == [0, 1]
    assert CK.identity(str(tmp_path / 'out'))['classes'] == ['a', 'b']


def test_identity_reads_no_image(tiny_data, tree, monkeypatch):
    """Class names in label order, counts, a fingerprint that tells other images of the same shape apart."""
    monkeypatch.setattr(Image, 'open', None)  # any decoded image fails
    fashion = CK.identity(tiny_data)
    assert fashion['classes'][0] == 'T-shirt/top' and fashion['size'] == 512 == sum(fashion['counts'])
    assert CK.identity(tiny_data) == fashion
    assert CK.identity(C.Config.data)['fingerprint'] != fashion['fingerprint']
    folder = CK.identity(str(tree[0]))
    assert folder['classes'] == ['apple', 'bird', 'car'] and folder['counts'] == [3, 4, 3]


@needs_ffcv
def test_the_ffcv_cache_is_checked_never_trusted(tiny_data, tmp_path, monkeypatch, capfd):
    """A cached .beton truncated, emptied or changed in place is named and written again; a cache that
    cannot be written (a regular file where the folder goes) is one warning and the in-memory loader."""
    monkeypatch.setattr(D, 'CACHE', str(tmp_path / 'cache'))
    root = D.small_betons(tiny_data, 1)
    path = os.path.join(root, 'train.beton')
    good = open(path, 'rb').read()
    flip = lambda b: b[:5000] + bytes([b[5000] ^ 1]) + b[5001:]  # one bit
    damages = [lambda b: b[: len(b) // 2], lambda b: b'', flip]
    for damage, why in zip(damages, ['bytes, ', 'bytes, ', 'SHA-256']):
        open(path, 'wb').write(damage(good))
        assert D.small_betons(tiny_data, 1) == root
        err = [line for line in capfd.readouterr().err.splitlines() if 'warning' in line]  # not FFCV's bars
        assert len(err) == 1 and err[0].startswith(f'warning: {path} is damaged') and why in err[0], err
        assert open(path, 'rb').read() == good
    assert D.small_betons(tiny_data, 1) == root and not capfd.readouterr().err  # intact: not written again
    (tmp_path / 'file').write_text('')
    monkeypatch.setattr(D, 'CACHE', str(tmp_path / 'file' / 'gradnorm'))
    train = D.make_loaders(C.parse_config([f'--data={tiny_data}', '--eval_n=8', '--workers=1']), 0, 1, CPU)[0]
    err = capfd.readouterr().err.strip().splitlines()
    assert isinstance(train, D.TensorLoader) and len(err) == 1, err
    assert err[0].startswith('warning: cannot write the FFCV cache') and 'XDG_CACHE_HOME' in err[0]
