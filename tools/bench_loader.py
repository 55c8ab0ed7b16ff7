"""FFCV vs torchvision images/s on the same JPEG files, side by side (python -m tools.bench loader)."""

import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from augment import BatchAugment, ffcv_loader, torchvision_loader
from config import RULES, checked
from data import VAL_SIDE, list_images, need_ffcv, randaug_transform
from models import IMAGENET_MEAN, IMAGENET_STD
from tools.beton import write_beton

# ---------------------------------------------------------------- loader

PHOTOS = (
    'astronaut',
    'chelsea',
    'coffee',
    'rocket',
    'immunohistochemistry',
    'hubble_deep_field',
    'stereo_motorcycle',
    'retina',
)


def photo_folder(
    root, per_class=8, classes=4, sizes=((500, 375), (375, 500), (500, 333), (400, 400)), quality=90
):
    """An ImageFolder of real photographs (skimage.data) at ImageNet-like sizes, as JPEG files."""
    import skimage.data

    photos = [getattr(skimage.data, n)() for n in PHOTOS]
    photos = [p[0] if isinstance(p, tuple) else p for p in photos]  # a stereo pair: the left image
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'c{c}'), exist_ok=True)
            for i in range(per_class):
                p = Image.fromarray(photos[(c * per_class + i) % len(photos)][..., :3])
                w, h = sizes[(c + i) % len(sizes)]
                s = rng.uniform(0.6, 1.0)  # a random crop, so no two files are the same
                cw, ch = int(p.width * s), int(p.height * s)
                x, y = rng.integers(0, p.width - cw + 1), rng.integers(0, p.height - ch + 1)
                p.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC).save(
                    os.path.join(root, split, f'c{c}', f'{i}.JPEG'), quality=quality
                )
    return root


def bench_loader(n=512, res=224, batch=64, workers=2, rounds=5, val_side=VAL_SIDE, randaug='', reprob=0.0):
    """Same JPEG files, crops, augmentations, resolution, batch size and worker count; side by side,
    alternating. randaug, reprob: as train.py's --randaug, --reprob (training loaders only)."""
    need_ffcv()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        photo_folder(tmp, per_class=n // 4)
        write_beton(tmp, os.path.join(tmp, 'beton'), workers=workers, val_side=val_side)
        aug = dict(
            randaug=randaug_transform(randaug, res, IMAGENET_MEAN) if randaug else None,
            on_batch=BatchAugment(0, 0, 4, IMAGENET_MEAN, IMAGENET_STD, reprob) or None,
        )
        train_what = (
            'random-resized crop + flip'
            + (f' + {randaug}' if randaug else '')
            + (f' + erasing {reprob}' if reprob else '')
        )
        for train, what in ((True, train_what), (False, 'center crop 224/256')):
            split = 'train' if train else 'val'
            kw = aug if train else {}
            loaders = {
                'ffcv': ffcv_loader(
                    f'{tmp}/beton/{split}.beton', batch, 'cpu', train, res, workers=workers, **kw
                ),
                'torchvision': torchvision_loader(
                    list_images(f'{tmp}/{split}')[1], batch, 'cpu', train, res, workers=workers, **kw
                ),
            }
            best = {}
            for r in range(rounds + 1):  # round 0: numba compilation, worker start-up
                for name, loader in loaders.items():
                    loader.set_epoch(r)
                    t0, seen = time.perf_counter(), 0
                    for x, _ in loader:
                        seen += len(x)
                    if r:
                        best[name] = max(best.get(name, 0), seen / (time.perf_counter() - t0))
            print(
                f'{split:5} ({what}, {res} px, batch {batch}, {workers} workers, {n} JPEGs): '
                f'ffcv {best["ffcv"]:.0f} img/s, torchvision {best["torchvision"]:.0f} img/s, '
                f'ratio {best["ffcv"] / best["torchvision"]:.2f}',
                flush=True,
            )


def add_args(sub):
    """The loader command of tools/bench.py."""
    positive = checked(int, lambda v: v >= 1, 'at least 1')
    b = sub.add_parser('loader', help='FFCV vs torchvision images/s on the same JPEGs')
    b.add_argument('--n', type=positive, default=512)
    b.add_argument('--workers', type=positive, default=2)
    b.add_argument('--batch', type=positive, default=64)
    b.add_argument(
        '--val-side',
        type=checked(int, lambda v: v == 0 or v >= 32, '0 or at least 32'),
        default=VAL_SIDE,
        help='as for tools/beton.py (0: val stored like train)',
    )
    b.add_argument(
        '--randaug',
        type=checked(str, *RULES['randaug']),
        default='',
        help="timm's RandAugment on both training loaders, e.g. rand-m9-mstd0.5-inc1 (train.py's --randaug)",
    )
    b.add_argument(
        '--reprob',
        type=checked(float, lambda v: 0 <= v <= 1, 'in [0, 1]'),
        default=0.0,
        help="random erasing on both training loaders' batches (train.py's --reprob)",
    )


def run(args):
    bench_loader(args.n, batch=args.batch, workers=args.workers, val_side=args.val_side, randaug=args.randaug,
                 reprob=args.reprob)


if __name__ == '__main__':  # a part of another command: --help says which
    print(__doc__)
