"""ImageFolder -> FFCV .beton files, the format data.py's fast loader reads (make beton).

python -m tools.beton /path/to/imagenet /path/to/betons   # train.beton, val.beton
"""

import argparse
import os
import sys
from multiprocessing import Pool

import numpy as np

from augment import load_rgb
from config import ArgumentParser, UserError, checked, cli, warn
from data import VAL_SIDE, class_folders, list_images, need_ffcv, write_split


def _decode_error(path):
    try:
        load_rgb(path, draft=64)  # the whole entropy-coded stream is still read: truncation fails
        return None
    except Exception as e:
        return f'{type(e).__name__}: {e}'


class _Photos:
    """-> (RGB uint8 HWC, label). short_side: torchvision's Resize(short_side), the first step of the
    ImageNet evaluation transform, done once here instead of at every epoch."""

    def __init__(self, samples, max_side=None, short_side=None):
        self.samples, self.max_side, self.short_side = samples, max_side, short_side

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        im = load_rgb(path, self.short_side or self.max_side)
        if self.short_side:
            from torchvision.transforms.functional import resize

            im = resize(im, self.short_side)
        return np.asarray(im), label


def write_beton(src, out, max_side=500, quality=90, compress=0.5, workers=None, val_side=VAL_SIDE):
    """ImageFolder src/{train,val}/<class>/<image> -> out/{train,val}.beton (+ {train,val}_files.txt,
    the relative path of each sample in order). Images that fail to decode are skipped, each with
    a warning, and counted. Train images keep their longer side <= max_side (random crops need the
    whole picture); val images are stored at short side val_side, as Resize(256) leaves them for the
    224 px center crop, which then needs no resampling at load time (0: stored like train).
    -> {split: (written, skipped)}"""
    need_ffcv()
    workers = workers or len(os.sched_getaffinity(0))
    os.makedirs(out, exist_ok=True)
    mode = 'raw' if compress <= 0 else 'jpg' if compress >= 1 else 'proportion'
    train, val = os.path.join(src, 'train'), os.path.join(src, 'val')
    if os.path.isdir(train) and os.path.isdir(val):
        list_images(val, class_folders(train))  # a class train/ lacks: refused before train.beton is written
    classes, result = None, {}
    for split in ('train', 'val'):
        folder = os.path.join(src, split)
        if not os.path.isdir(folder):
            raise UserError(
                f'no {folder!r}: expected an ImageFolder tree {src}/{{train,val}}/<class>/<image>'
            )
        classes, samples = list_images(folder, classes)  # val takes train's class order
        with Pool(workers) as pool:
            errors = pool.map(_decode_error, [p for p, _ in samples], chunksize=64)
        for (p, _), e in zip(samples, errors):
            if e:
                warn(f'skipping {p}: cannot decode it ({e})')
        good = [s for s, e in zip(samples, errors) if e is None]
        print(
            f'{split}: writing {len(good)} images, {len(samples) - len(good)} skipped as undecodable',
            flush=True,
        )
        # a name that is not UTF-8 is written as its bytes, as the file system holds it (and data.py reads it)
        with open(os.path.join(out, f'{split}_files.txt.tmp'), 'w', errors='surrogateescape') as f:
            f.writelines(os.path.relpath(p, folder).replace(os.sep, '/') + '\n' for p, _ in good)
        sized = _Photos(good, short_side=val_side) if split == 'val' and val_side else _Photos(good, max_side)
        write_split(
            sized, os.path.join(out, f'{split}.beton'), workers, mode, sized.max_side, quality, compress
        )
        os.replace(os.path.join(out, f'{split}_files.txt.tmp'), os.path.join(out, f'{split}_files.txt'))
        size = os.path.getsize(os.path.join(out, f'{split}.beton'))
        print(f'{out}/{split}.beton: {len(good)} images, {size / 2**20:.1f} MiB', flush=True)
        result[split] = (len(good), len(samples) - len(good))
    with open(os.path.join(out, 'classes.txt'), 'w', errors='surrogateescape') as f:  # names, in label order
        f.writelines(c + '\n' for c in classes)
    return result


def main(argv):
    w = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument(
        'src',
        type=checked(
            str,
            lambda v: all(os.path.isdir(os.path.join(v, s)) for s in ('train', 'val')),
            'an ImageFolder tree with train/ and val/ folders',
        ),
        help='an ImageFolder tree: train/<class>/*, val/<class>/*',
    )
    w.add_argument('out', help='the folder to write train.beton, val.beton, val_files.txt to')
    w.add_argument(
        '--max-side',
        type=checked(int, lambda v: v >= 32, 'at least 32'),
        default=500,
        help='longer side is shrunk to this (ffcv-imagenet: 500)',
    )
    w.add_argument(
        '--quality',
        type=checked(int, lambda v: 1 <= v <= 100, 'in [1, 100]'),
        default=90,
        help='JPEG quality of the compressed images',
    )
    w.add_argument(
        '--compress',
        type=checked(float, lambda v: 0 <= v <= 1, 'in [0, 1]'),
        default=0.5,
        help='fraction stored as JPEG, the rest as raw pixels (0 = all raw, 1 = all JPEG)',
    )
    w.add_argument(
        '--val-side',
        type=checked(int, lambda v: v == 0 or v >= 32, '0 or at least 32'),
        default=VAL_SIDE,
        help='val images are stored at this short side (224 / 0.875); 0 = like train',
    )
    w.add_argument('--workers', type=checked(int, lambda v: 1 <= v <= 256, 'in [1, 256]'), default=None,
                   help='writer processes (default: the CPUs this process may use)')
    args = w.parse_args(argv)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create {args.out!r} ({e.strerror}): pass another output folder') from None
    write_beton(args.src, args.out, args.max_side, args.quality, args.compress, args.workers, args.val_side)


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
