"""augment.py: crops, flips, RandAugment, random erasing and Mixup/CutMix, each a function of (seed,
epoch, sample), the same on FFCV's loader, torchvision's and the in-memory one."""

import numpy as np
import pytest
import torch
from PIL import Image

import augment as A
import data as D
import models as M
from tests.conftest import CPU, check_batch, collect, needs_ffcv


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

    (x, y), _ = D.load_fashion_mnist(tiny_data)
    D.write_split(D.gray_as_rgb(x, y), str(tmp_path / 'train.beton'), workers=1, write_mode='raw')
    runs = [
        epochs_of(
            A.ffcv_loader(
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

    return D.randaug_transform('rand-m9-mstd0.5-inc1', 64, M.IMAGENET_MEAN)


@needs_ffcv
def test_ffcv_crops_flips_randaug_erasing_reproducible_for_any_thread_count(betons, randaug):
    """Photos: random-resized crop + flip (+ RandAugment) from (seed, epoch, index): two loaders, 1
    and 2 threads, the same batches for two epochs; epochs differ; RandAugment changes most images,
    and so does random erasing on the batch, the same way every time."""

    path = str(betons[0] / 'train.beton')
    make = lambda w, ra: A.ffcv_loader(path, 4, CPU, True, 64, workers=w, seed=3, randaug=ra)
    plain_loader = make(1, None)  # one thread: FFCV compiles a parallel pipeline for seconds more
    one, two, plain = epochs_of(make(1, randaug)), epochs_of(make(2, randaug)), epochs_of(plain_loader)
    for e in (0, 1):
        assert same(one[e], two[e]), e
        assert torch.equal(one[e][1], plain[e][1])  # the same images in the same order
    assert not torch.equal(one[0][0], one[1][0])
    changed = (one[0][0] != plain[0][0]).flatten(1).any(1)
    assert changed.float().mean() >= 0.5, changed  # 2 ops at p=0.5 each: 3 in 4 images on average
    check_batch(one[0][0], one[0][1], 64)
    plain_loader.on_batch = A.BatchAugment(3, 0, 3, M.IMAGENET_MEAN, M.IMAGENET_STD, reprob=1.0)
    erased, again = epochs_of(plain_loader, (0,)), epochs_of(plain_loader, (0,))
    assert same(erased[0], again[0]) and (erased[0][0] != plain[0][0]).flatten(1).any(1).all()


def test_torchvision_fallback_runs_randaug_in_workers_and_mixes_the_batch(tree, randaug):
    """The fallback (torchvision's own random transforms): timm's RandAugment in 2 worker processes, then
    Mixup/CutMix on the batch: soft labels over the folder's 3 classes, each row summing to 1."""

    mix = A.BatchAugment(3, 0, 3, M.IMAGENET_MEAN, M.IMAGENET_STD, mixup=0.8, cutmix=1.0)
    samples = D.list_images(str(tree[0] / 'train'))[1]
    loader = A.torchvision_loader(samples, 4, CPU, True, 64, workers=2, randaug=randaug, on_batch=mix)
    for x, y in loader:
        assert x.shape == (4, 3, 64, 64) and 0 <= x.min() and x.max() <= 1 and y.shape == (4, 3)
        assert torch.allclose(y.sum(1), torch.ones(4)) and (y < 1).any()


def test_in_memory_demo_randaug_reproducible(tiny_data):
    """The demo without FFCV (TensorLoader): RandAugment per image from (seed, epoch, index)."""

    (x, y), _ = D.load_fashion_mnist(tiny_data)
    ra = D.randaug_transform('rand-m9-mstd0.5-inc1', 28, D.FASHION_MEAN)
    make = lambda ra: D.TensorLoader(x[:128], y[:128], 64, CPU, True, seed=2, randaug=ra)
    a, b, plain = epochs_of(make(ra)), epochs_of(make(ra)), epochs_of(make(None))
    assert same(a[0], b[0]) and same(a[1], b[1]) and not torch.equal(a[0][0], a[1][0])
    assert (a[0][0] != plain[0][0]).flatten(1).any(1).float().mean() >= 0.5
