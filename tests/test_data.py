"""The data path (issue 3): ImageFolder of real photos -> .beton -> batches, FFCV and torchvision.
.venv/bin/python -m pytest -q test_data.py
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import config as C
import data as D
import models as M
from tools import beton

needs_ffcv = pytest.mark.skipif(D.ffcv_error() is not None, reason=f'FFCV: {D.ffcv_error()}')
CPU = torch.device('cpu')


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


def broken(files):
    return next(p for p, _, ok in files if not ok)


@pytest.fixture(scope='module')
def betons(tree, tmp_path_factory):
    if D.ffcv_error():
        pytest.skip(f'FFCV: {D.ffcv_error()}')
    out = tmp_path_factory.mktemp('beton')
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):  # all-JPEG (compress=1): the test bounds JPEG loss, the worst case
        counts = beton.write_beton(str(tree[0]), str(out), max_side=500, quality=90, compress=1.0, workers=2)
    return out, counts, err.getvalue()


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


def collect(loader):
    """Every batch, copied: FFCV reuses its buffers, a batch is valid until the next is drawn."""
    xs, ys = zip(*((x.clone(), y) for x, y in loader))
    return torch.cat(xs), torch.cat(ys)


def check_batch(x, y, res, classes=3):
    assert x.shape[1:] == (3, res, res) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.05  # real pixels, not zeros
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert ((0 <= y) & (y < classes)).all()


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
    x, y = collect(D.ffcv_loader(str(out / 'val.beton'), 4, CPU, train=False))
    assert y.tolist() == [c for _, c, ok in files['val'] if ok]  # sorted-class labels, in order
    check_batch(x, y, 224)


@needs_ffcv
def test_val_matches_pil_center_crop(betons, tree):
    x, _ = collect(D.ffcv_loader(str(betons[0] / 'val.beton'), 4, CPU, train=False))
    good = [p for p, _, ok in tree[1]['val'] if ok]
    scores = [psnr(a, reference(p)) for a, p in zip(x, good)]
    assert min(scores) >= 30, scores  # JPEG q90 only; a wrong crop, scale or channel order is < 20 dB


def test_torchvision_fallback(tree, capfd):
    root, files = tree
    x, y = collect(D.torchvision_loader(str(root / 'val'), 4, CPU, train=False, workers=0))
    err = capfd.readouterr().err
    assert f'cannot decode {broken(files["val"])}' in err
    assert len(y) == len(files['val'])  # the broken file's slot holds the next image
    assert [v for v, (_, _, ok) in zip(y.tolist(), files['val']) if ok] == [
        c for _, c, ok in files['val'] if ok
    ]
    good = [(a, p) for a, (p, _, ok) in zip(x, files['val']) if ok]
    assert min(psnr(a, reference(p)) for a, p in good) >= 30
    check_batch(x, y, 224)
    x, y = next(iter(D.torchvision_loader(str(root / 'train'), 4, CPU, train=True, res=160, workers=0)))
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
        'torchvision': D.torchvision_loader(f'{root}/train', 5, CPU, True, 32, rank, 2, seed=3, workers=0)
    }
    if not D.ffcv_error():
        loaders['ffcv'] = D.ffcv_loader(
            f'{root}/beton/train.beton', 5, CPU, True, 32, rank=rank, world=2, seed=3
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
    D.write_split(D._GrayAsRGB(images, labels), path, workers=1, write_mode='raw')


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
def test_progressive_resizing_and_mixup(loader, tree, tmp_path_factory):
    """--res_start grows the training resolution over the epochs (val stays at --res); --mixup and
    --cutmix give soft labels that are convex combinations of two one-hot rows, and images still in [0,1]."""
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
            '--res_start=32',
            '--epochs=4',
            '--mixup=0.8',
            '--cutmix=1.0',
            '--reprob=0',
            '--workers=2',
        ]
    )
    train, val, _, _ = D.make_loaders(cfg, 0, 1, CPU)
    sizes = []
    for epoch in (0, 3):
        train.set_epoch(epoch)
        x, y = next(iter(train))
        sizes.append(x.shape[-1])
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))
        assert (y > 0).sum(1).max() <= 2 and (y.max(1).values >= 0.5 - 1e-6).all()
    assert sizes == [32, 64]
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


# -------------------------------------------- augmentations: a function of (seed, epoch, sample)


def epochs_of(loader, epochs=(0, 1)):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append(collect(loader))
    return out


def same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


@needs_ffcv
def test_crop_rule_is_torchvisions_and_the_same_in_numba():
    """augment.crop_params draws the crop from torchvision's distribution (RandomResizedCrop.get_params,
    its own random numbers); numba (FFCV's path) and Python (the fallback's) compute the same boxes."""
    import numba
    import torchvision.transforms as T

    import augment as A

    A.ffcv_ops()  # makes augment's functions callable from numba

    @numba.njit
    def boxes(hs, ws, out):
        for k in range(len(hs)):
            out[k] = A.crop_params(hs[k], ws[k], 5, 2, np.int64(k), A.SCALE, A.RATIO)

    rng = np.random.default_rng(0)
    hs, ws = rng.integers(1, 900, 3000), rng.integers(1, 900, 3000)
    jit = np.zeros((3000, 4), np.int64)
    boxes(hs, ws, jit)
    assert np.array_equal(
        jit, [A.crop_params(int(h), int(w), 5, 2, k) for k, (h, w) in enumerate(zip(hs, ws))]
    )
    ours = np.array([A.crop_params(375, 500, 0, 0, k) for k in range(4000)], float)
    torch.manual_seed(0)
    theirs = np.array(
        [
            T.RandomResizedCrop.get_params(Image.new('RGB', (500, 375)), [0.08, 1], [3 / 4, 4 / 3])
            for _ in range(4000)
        ],
        float,
    )
    se = np.sqrt(ours.var(0) / 4000 + theirs.var(0) / 4000)
    assert (abs(ours.mean(0) - theirs.mean(0)) < 4 * se).all(), (ours.mean(0), theirs.mean(0))
    assert (ours[:, 0] + ours[:, 2] <= 375).all() and (ours[:, 1] + ours[:, 3] <= 500).all()
    assert np.unique(ours, axis=0).shape[0] > 3900  # every index its own box


def test_batch_augment_erases_mixes_and_is_a_function_of_its_key():
    import augment as A

    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    aug = A.BatchAugment(7, 0, 10, mean, std, reprob=1.0)
    x, y = torch.full((64, 3, 32, 32), 0.5), torch.arange(64) % 10
    state = torch.get_rng_state()
    a, _ = aug(x.clone(), y, 3, 5)
    assert torch.equal(torch.get_rng_state(), state)  # training's generator is left as it was
    assert torch.equal(aug(x.clone(), y, 3, 5)[0], a)  # same (seed, epoch, batch): same erasing
    for other in (
        aug(x.clone(), y, 4, 5)[0],
        aug(x.clone(), y, 3, 6)[0],
        A.BatchAugment(7, 1, 10, mean, std, reprob=1.0)(x.clone(), y, 3, 5)[0],
    ):  # epoch, batch, rank
        assert not torch.equal(other, a)
    erased = a != 0.5
    assert erased.flatten(1).any(1).float().mean() > 0.9  # p=1 (a box fits in 10 tries nearly always)
    fraction = erased[:, 0].flatten(1).float().mean(1)
    assert fraction.max() <= 1 / 3 + 1e-6 and fraction[fraction > 0].min() >= 0.015  # area 2%-33%
    z = (a - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    noise = z.permute(1, 0, 2, 3)[erased.permute(1, 0, 2, 3)]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02  # N(0,1) in normalized units, as timm's
    mixed = A.BatchAugment(7, 0, 10, mean, std, mixup=0.8, cutmix=1.0)
    x = torch.rand(64, 3, 32, 32)
    xm, ym = mixed(x.clone(), y, 0, 0)
    assert torch.equal(mixed(x.clone(), y, 0, 0)[0], xm) and ym.shape == (64, 10)
    assert torch.allclose(ym.sum(1), torch.ones(64)) and ((ym > 0).sum(1) <= 2).all()
    assert not A.BatchAugment(7, 0, 10, mean, std)  # nothing on: Batches skips it


@needs_ffcv
def test_fashion_beton_flips_are_a_function_of_seed_epoch_index(tiny_data, tmp_path):
    """The demo's path: raw Fashion-MNIST in a .beton, SeededFlip. 1 or 2 threads, the same batches;
    each image is the stored one, mirrored exactly when augment.uniform(seed, epoch, index, FLIP) < 0.5."""
    import augment as A

    (x, y), _ = D.load_fashion_mnist(tiny_data)
    D.write_split(D._GrayAsRGB(x, y), str(tmp_path / 'train.beton'), workers=1, write_mode='raw')
    runs = [
        epochs_of(
            D.ffcv_loader(
                str(tmp_path / 'train.beton'), 64, CPU, True, crop=False, workers=w, seed=1, channels=1
            )
        )
        for w in (1, 2)
    ]
    assert same(runs[0][0], runs[1][0]) and same(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0][1], runs[0][1][1])  # a new order every epoch
    stored = {x[i].numpy().tobytes(): (i, False) for i in range(len(x))}
    mirrored = {x[i].flip(2).numpy().tobytes(): (i, True) for i in range(len(x))}
    for epoch, (xs, _) in enumerate(runs[0]):
        flips = []
        for img in (xs * 255).round().byte():
            key = img.numpy().tobytes()
            assert key in stored or key in mirrored
            if (key in stored) != (key in mirrored):  # not a symmetric image
                i, flipped = stored.get(key) or mirrored[key]
                assert flipped == (A.uniform(1, epoch, i, A.FLIP) < 0.5), (epoch, i)
                flips.append(flipped)
        assert 0.4 < np.mean(flips) < 0.6 and len(flips) > 400


@pytest.fixture(scope='module')
def randaug():
    import augment as A

    return A.randaug_transform('rand-m9-mstd0.5-inc1', 64, M.IMAGENET_MEAN)


@needs_ffcv
def test_ffcv_crops_flips_randaug_erasing_reproducible_for_any_thread_count(betons, randaug):
    """Photos: random-resized crop + flip (+ RandAugment) from (seed, epoch, index): two loaders, 1
    and 2 threads, the same batches for two epochs; epochs differ; RandAugment changes most images,
    and so does random erasing on the batch, the same way every time."""
    import augment as A

    path = str(betons[0] / 'train.beton')
    make = lambda w, ra: D.ffcv_loader(path, 4, CPU, True, 64, workers=w, seed=3, randaug=ra)
    plain_loader = make(2, None)
    one, two, plain = epochs_of(make(1, randaug)), epochs_of(make(2, randaug)), epochs_of(plain_loader)
    for e in (0, 1):
        assert same(one[e], two[e]), e
        assert torch.equal(one[e][1], plain[e][1])  # the same images in the same order
    assert not torch.equal(one[0][0], one[1][0])
    changed = (one[0][0] != plain[0][0]).flatten(1).any(1)
    assert changed.float().mean() >= 0.5, changed  # 2 ops at p=0.5 each: 3 in 4 images on average
    check_batch(one[0][0], one[0][1], 64)
    plain_loader.augment = A.BatchAugment(3, 0, 3, M.IMAGENET_MEAN, M.IMAGENET_STD, reprob=1.0)
    erased, again = epochs_of(plain_loader, (0,)), epochs_of(plain_loader, (0,))
    assert same(erased[0], again[0]) and (erased[0][0] != plain[0][0]).flatten(1).any(1).all()


def test_torchvision_crops_flips_randaug_erasing_reproducible(tree, randaug):
    """The fallback: the same rules in worker processes (0 or 2 of them, persistent), and erasing
    and Mixup/CutMix on the batch: the same batches for two epochs; epochs differ; both change them."""
    import augment as A

    folder = str(tree[0] / 'train')
    make = lambda w, ra, aug: D.torchvision_loader(
        folder, 4, CPU, True, 64, workers=w, seed=3, randaug=ra, on_batch=aug
    )
    batch_aug = A.BatchAugment(3, 0, 3, M.IMAGENET_MEAN, M.IMAGENET_STD, reprob=0.5, mixup=0.8, cutmix=1.0)
    zero, two = epochs_of(make(0, randaug, batch_aug)), epochs_of(make(2, randaug, batch_aug))
    plain, no_erase = epochs_of(make(0, None, None)), epochs_of(make(2, randaug, None))
    for e in (0, 1):
        assert same(zero[e], two[e]), e
    assert not torch.equal(zero[0][0], zero[1][0])
    assert (no_erase[0][0] != plain[0][0]).flatten(1).any(1).float().mean() >= 0.5  # RandAugment
    assert not torch.equal(zero[0][0], no_erase[0][0])  # erasing and mixing on top


def test_in_memory_demo_randaug_reproducible(tiny_data):
    """The demo without FFCV (TensorLoader): RandAugment per image from (seed, epoch, index)."""
    import augment as A

    (x, y), _ = D.load_fashion_mnist(tiny_data)
    ra = A.randaug_transform('rand-m9-mstd0.5-inc1', 28, D.FASHION_MEAN)
    make = lambda ra: D.TensorLoader(x[:128], y[:128], 64, CPU, True, seed=2, randaug=ra)
    a, b, plain = epochs_of(make(ra)), epochs_of(make(ra)), epochs_of(make(None))
    assert same(a[0], b[0]) and same(a[1], b[1]) and not torch.equal(a[0][0], a[1][0])
    assert (a[0][0] != plain[0][0]).flatten(1).any(1).float().mean() >= 0.5
