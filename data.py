"""The loaders of train.py and evaluate.py. Each yields (x, y): x float in [0,1] on the device,
channels_last; y int64 (soft labels with --mixup or --cutmix). `--data` is a Fashion-MNIST IDX folder
(the demo, cached once as .beton), a folder with train.beton + val.beton (tools/beton.py writes them),
or an ImageFolder (train/<class>/*, val/<class>/*).
"""
import functools
import glob
import gzip
import hashlib
import os
import socket
import sys

# numba's default threading layer (TBB) can abort at exit, OpenMP's does not (docs/speed.md,
# section 5). Set before numba is imported.
os.environ.setdefault('NUMBA_THREADING_LAYER', 'omp')

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import augment
from config import Config, UserError, data_kind
from models import IMAGENET_MEAN, IMAGENET_STD

INSTALL_FFCV = ('install it with `make setup` (= apt-get install pkg-config g++ libturbojpeg0-dev '
                'libopencv-dev; pip install ffcv==1.0.2), or pass --loader=torchvision')
FASHION_MEAN, FASHION_STD = (0.286,), (0.353,)
HERE = os.path.dirname(os.path.abspath(__file__))
ROBUSTBENCH_LIST = os.path.join(HERE, 'lists', 'robustbench_imagenet_val_5000.txt')
CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'gradnorm')
VAL_SIDE = 256  # short side of the stored val images: 224 px center crops without resampling


@functools.cache
def ffcv_error():
    """None if FFCV imports, else why not. Imported on first use: it takes seconds."""
    try:
        import ffcv.fields.decoders  # noqa: F401
    except Exception as e:  # ImportError, or OSError for a missing system library
        return f'{type(e).__name__}: {e}'
    return None


def need_ffcv():
    if ffcv_error():
        raise UserError(f'FFCV is not importable ({ffcv_error()}): {INSTALL_FFCV}')


def warn(msg):
    print(f'warning: {msg}', file=sys.stderr, flush=True)


# ---------------------------------------------------------------- Fashion-MNIST (the demo)

def read_idx(path):
    """One IDX file (the MNIST format): big-endian dims after a 4-byte magic."""
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def load_fashion_mnist(root):
    names = ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
             't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']
    missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise UserError(f'no Fashion-MNIST in {root!r} (missing {missing[0]}): run `make data` '
                        '(apt-get install dataset-fashion-mnist), or pass --data=DIR with train.beton + '
                        'val.beton or an ImageFolder train/ + val/')
    xtr, ytr, xte, yte = (read_idx(os.path.join(root, n)) for n in names)
    return (xtr[:, None], ytr.long()), (xte[:, None], yte.long())


class TensorLoader:
    """In-memory uint8 images -> float batches in [0,1] on the device, each rank its shard of a
    seeded order; Fashion-MNIST without FFCV (or with --loader=torchvision)."""

    def __init__(self, images, labels, batch_size, device, train, seed=0, rank=0, world=1, randaug=None):
        self.images, self.labels, self.train, self.seed, self.randaug = images, labels, train, seed, randaug
        self.device, self.rank, self.world = device, rank, world
        self.batch = batch_size // world if train else batch_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        per_rank = len(self.labels) // self.world if self.train else -(-len(self.labels) // self.world)
        return per_rank // self.batch if self.train else -(-per_rank // self.batch)

    def __iter__(self):
        n = len(self.labels)
        if self.train:  # drop_last: a new batch shape would make torch.compile recompile
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            idx = torch.randperm(n, generator=g)[: n // self.world * self.world][self.rank::self.world]
        else:
            idx = torch.arange(self.rank, n, self.world)
        for i in range(len(self)):
            j = idx[i * self.batch:(i + 1) * self.batch]
            x = self.images[j]
            if self.train:  # flip, then RandAugment, as FFCV's path and timm order them
                # uniform(...) < 0.5, in integers
                flip = augment.rand_u32(self.seed, self.epoch, j, augment.FLIP) < 2 ** 31
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
                x = augment.randaug_gray(self.randaug, x, self.seed, self.epoch, j) if self.randaug else x
            x = x.to(self.device, non_blocking=True).float().div_(255)
            yield x.contiguous(memory_format=torch.channels_last), self.labels[j].to(self.device)


def gray_as_rgb(images, labels):
    """FFCV's image field is RGB: each gray image is stored raw (lossless) as 3 equal channels, and the
    loader keeps one, so the model sees exactly the IDX pixels. -> [(HxWx3 uint8, label)], for write_split"""
    return list(zip(np.repeat(images.numpy()[:, 0, :, :, None], 3, axis=3), labels.tolist()))


def fashion_cache(root):
    """CACHE/fashion-mnist-<key>: the key names the source files, their sizes and times, so
    another copy (a test's subset, say) gets its own cache."""
    files = sorted(glob.glob(os.path.join(root, '*-ubyte.gz')))
    stamps = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
    key = hashlib.sha1(repr(stamps).encode())
    return os.path.join(CACHE, f'fashion-mnist-{key.hexdigest()[:12]}')


def fashion_betons(root, workers):
    """Writes Fashion-MNIST once to fashion_cache(root)/{train,val}.beton; -> that folder."""
    out = fashion_cache(root)
    if data_kind(out) != 'beton':
        (xtr, ytr), (xte, yte) = load_fashion_mnist(root)
        os.makedirs(out, exist_ok=True)
        for split, (x, y) in (('train', (xtr, ytr)), ('val', (xte, yte))):
            write_split(gray_as_rgb(x, y), os.path.join(out, f'{split}.beton'), workers, write_mode='raw')
    return out


# ---------------------------------------------------------------- writing .beton files

def load_rgb(path, draft=None):
    """Any file PIL can decode (by content: a PNG named .JPEG too) -> RGB; alpha is composited over white.
    draft: the JPEG decoder may shrink by 2/4/8 (exact DCT scaling, fast) while both sides stay >= draft."""
    with Image.open(path) as im:
        if draft:
            im.draft('RGB', (draft, draft))
        if im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info:
            rgba = im.convert('RGBA')
            white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert('RGB')
        return im.convert('RGB')


def class_folders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def list_images(folder, classes=None):
    """ImageFolder order: sorted classes -> labels 0..C-1, sorted files; with classes (val takes
    train's), folder must have no other class. -> classes, [(path, label)]"""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    # a class train/ lacks: its images would be dropped without a word, or carry labels never trained
    if classes and (extra := sorted(set(class_folders(folder)) - set(classes))):
        raise UserError(f'{os.path.join(folder, extra[0])} is a class folder the {len(classes)} training '
                        f'classes lack ({len(extra)} such): add it to train/ or move it out of {folder}')
    classes = classes or class_folders(folder)
    if not classes:
        raise UserError(f'{folder!r} has no class folders: expected {folder}/<class>/<image>')
    labels = {c: i for i, c in enumerate(classes)}
    return classes, make_dataset(folder, labels, IMG_EXTENSIONS, allow_empty=True)


def write_split(dataset, path, workers, write_mode='proportion', max_side=None, quality=90, compress=0.5):
    """FFCV's DatasetWriter into a temporary file, renamed at the end: no interrupted .beton looks complete,
    and two writers of one file (the first rank of each node, on a shared disk) never mix."""
    need_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    tmp = f'{path}.{socket.gethostname()}-{os.getpid()}.tmp'
    fields = {'image': RGBImageField(write_mode=write_mode, max_resolution=max_side, jpeg_quality=quality,
                                     compress_probability=compress), 'label': IntField()}
    DatasetWriter(tmp, fields, num_workers=workers).from_indexed_dataset(dataset, chunksize=64)
    os.replace(tmp, path)


# ---------------------------------------------------------------- loaders

class Batches:
    """(uint8 or [0,1] float NCHW, labels) -> x float in [0,1] on the device, channels_last, y int64, then
    on_batch (augment.BatchAugment). From FFCV on the CPU, x is its buffer: valid until the next batch."""

    def __init__(self, loader, device, set_epoch, channels=3, on_batch=None):
        self.loader, self.device, self._set_epoch, self.channels = loader, device, set_epoch, channels
        self.on_batch, self.epoch = on_batch or None, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self._set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, (x, y) in enumerate(self.loader):
            # the layout first, while the pixels are 1-byte; uint8 / 255 makes float32 in one pass
            x = x[:, :self.channels].to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            x = x.div(255) if x.dtype == torch.uint8 else x
            # FFCV reuses its output buffers: copy the labels
            y = y.to(self.device, non_blocking=True).view(-1).to(torch.int64, copy=True)
            if self.on_batch:
                x, y = self.on_batch(x, y, self.epoch, i)
            yield x, y


def beton_labels(path):
    """The label of every sample, from the .beton's metadata table (no image is read)."""
    from ffcv.reader import Reader
    reader = Reader(path)
    return reader.metadata[f'f{list(reader.handlers).index("label")}']


def ffcv_loader(path, batch_size, device, train, res=224, crop=True, rank=0, world=1, seed=0, workers=2,
                indices=None, channels=3, randaug=None, on_batch=None):
    """train: shuffled (DDP: each rank its shard), random-resized crop + flip (+ randaug), each a function
    of (seed, epoch, image index) (augment.ffcv_ops); val: center crop, in order, each rank every world-th
    of indices (default: all). crop=False: fixed-size images as stored."""
    need_ffcv()
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    SeededRandomResizedCrop, SeededFlip, RandAugment = augment.ffcv_ops()
    if not crop:
        decoder = SimpleRGBImageDecoder()
    elif train:
        decoder = SeededRandomResizedCrop(seed, (res, res))
    else:
        decoder = CenterCropRGBImageDecoder((res, res), augment.VAL_RATIO)
    augs = []
    if train:
        augs = [SeededFlip(seed)] + ([RandAugment(seed, randaug)] if randaug is not None else [])
    device = torch.device(device)
    # GPU: uint8 to the device, float there (a quarter of the bytes). CPU: / 255 in FFCV's threads, into
    # buffers it reuses; not with RandAugment (Python), which FFCV 1.0.2 cannot put before a compiled op
    # (docs/data.md, Loader speed)
    on_device = [ToTensor(), ToDevice(device, non_blocking=True)]
    if device.type == 'cpu' and randaug is None:
        on_device = [NormalizeImage(np.zeros(3), np.full(3, 255.0), np.float32), ToTensor()]
    image = [decoder] + augs + on_device + [ToTorchImage(channels_last=True)]
    label = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    from ffcv.reader import Reader
    size = Reader(path).num_samples
    if indices is not None and len(indices) and not 0 <= min(indices) <= max(indices) < size:
        # FFCV would read past the end: phantom samples, junk labels
        raise ValueError(f'{path} holds samples 0..{size - 1}, not {min(indices)}..{max(indices)}')
    if not train:  # not distributed=True: DistributedSampler pads with repeats, which would bias accuracy
        indices = np.asarray(range(size) if indices is None else indices)[rank::world]
    loader = Loader(path, batch_size, num_workers=workers, os_cache=True, order=order, seed=seed,
                    distributed=train and world > 1, indices=indices, drop_last=train,
                    pipelines={'image': image, 'label': label})
    seeded = [op for op in [decoder] + augs if isinstance(op, augment.Seeded)]

    def set_epoch(epoch):
        loader.next_epoch = epoch  # FFCV's order is a function of seed + epoch
        for op in seeded:
            op.epoch = epoch
    return Batches(loader, device, set_epoch, channels, on_batch)


class _Folder(torch.utils.data.Dataset):
    """(path, label) pairs -> (transform(load_rgb(path)), label); an undecodable file is reported and the
    next image takes its place (the FFCV writer drops such files instead)."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                return self.transform(load_rgb(path)), label
            except Exception as e:
                warn(f'cannot decode {path} ({type(e).__name__}: {e}); using the next image in its place')
        raise UserError('no image of the folder can be decoded')


def center(im, res):
    """The central res square, its offset rounded down as FFCV's (T.CenterCrop rounds it to even)."""
    left, top = (im.width - res) // 2, (im.height - res) // 2
    return im.crop((left, top, left + res, top + res))


def torchvision_loader(folder, batch_size, device, train, res=224, rank=0, world=1, seed=0, workers=2,
                       indices=None, classes=None, randaug=None, on_batch=None):
    """The fallback where FFCV does not build: torchvision's transforms (train: random-resized crop, flip,
    RandAugment; val: ImageNet's center crop) in a DataLoader, DistributedSampler's order under DDP."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from torchvision import transforms as T
    samples = list_images(folder, classes)[1]
    if train:
        tf = [T.RandomResizedCrop(res), T.RandomHorizontalFlip()] + ([randaug] if randaug else [])
        dataset = _Folder(samples, T.Compose(tf + [T.PILToTensor()]))
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
    else:
        tf = T.Compose([T.Resize(round(res / augment.VAL_RATIO)), functools.partial(center, res=res),
                        T.PILToTensor()])
        idx = range(len(samples)) if indices is None else indices
        dataset, sampler = Subset(_Folder(samples, tf), list(idx)[rank::world]), None
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                        pin_memory=torch.device(device).type == 'cuda', persistent_workers=workers > 0)
    return Batches(loader, torch.device(device), sampler.set_epoch if train else (lambda epoch: None),
                   on_batch=on_batch)


def robustbench_indices(names, n):
    """Positions in names ('wnid/file.JPEG') of the first n of RobustBench's 5,000 ImageNet val images, as
    the paper and the leaderboard use; None if the list does not apply (n > 5000, or files missing)."""
    with open(ROBUSTBENCH_LIST) as f:
        wanted = f.read().split()[:n]
    where = {name: i for i, name in enumerate(names)}
    if n > len(wanted) or any(w not in where for w in wanted):
        return None
    return [where[w] for w in wanted]


def data_shape(data):
    """-> dict(in_ch, num_classes) of the data at this path, as make_loaders' info will say, read
    without opening an image: a checkpoint can be checked against it before any loading."""
    kind = data_kind(data)
    if kind == 'fashion':
        return dict(in_ch=1, num_classes=10)
    if kind == 'folder':
        return dict(in_ch=3, num_classes=len(class_folders(os.path.join(data, 'train'))))
    need_ffcv()
    return dict(in_ch=3, num_classes=int(beton_labels(f'{data}/train.beton').max()) + 1)


def clamp_eval_n(cfg, size, rank, n_flag):
    """cfg.eval_n at most the size of the validation split, so every later message (the number of
    held-out images) is true; said once if n_flag set it (a default means 'up to': no word)."""
    if cfg.eval_n > size:
        if rank == 0 and n_flag and not (n_flag == '--eval_n' and cfg.eval_n == Config.eval_n):
            warn(f'{n_flag}={cfg.eval_n} is more than the {size} validation images: using all {size}')
        cfg.eval_n = size


def fashion_loaders(cfg, rank, world, device, workers, n_flag, from_checkpoint):
    """make_loaders on Fashion-MNIST: through FFCV (the .beton cache, written once), else in memory."""
    if cfg.res != Config.res and rank == 0 and not from_checkpoint:
        warn(f'--res={cfg.res} is ignored: Fashion-MNIST\'s images are 28 px and are used as they are')
    info = dict(in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD)
    aug = augment.from_config(cfg, rank, 10, 28, FASHION_MEAN, FASHION_STD)
    if cfg.loader == 'torchvision' or ffcv_error():
        if cfg.loader == 'ffcv' and rank == 0:
            warn(f'FFCV is not importable ({ffcv_error()}); Fashion-MNIST is read in memory instead')
        (xtr, ytr), (xte, yte) = load_fashion_mnist(cfg.data)
        clamp_eval_n(cfg, len(yte), rank, n_flag)
        train = TensorLoader(xtr, ytr, cfg.batch_size, device, True, cfg.seed, rank, world, aug['randaug'])
        if aug['on_batch']:
            train = Batches(train, device, train.set_epoch, 1, aug['on_batch'])
        val = TensorLoader(xte, yte, 500, device, False, rank=rank, world=world)
        n = cfg.eval_n
        return train, val, TensorLoader(xte[:n], yte[:n], 500, device, False, rank=rank, world=world), info
    if int(os.environ.get('LOCAL_RANK', rank)) == 0:
        fashion_betons(cfg.data, workers)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for the cache
    root = fashion_cache(cfg.data)
    from ffcv.reader import Reader
    clamp_eval_n(cfg, Reader(f'{root}/val.beton').num_samples, rank, n_flag)
    kw = dict(device=device, crop=False, rank=rank, world=world, seed=cfg.seed, workers=workers, channels=1)
    return (ffcv_loader(f'{root}/train.beton', cfg.batch_size // world, train=True, **aug, **kw),
            ffcv_loader(f'{root}/val.beton', 500, train=False, **kw),
            ffcv_loader(f'{root}/val.beton', 500, train=False, indices=range(cfg.eval_n), **kw), info)


def make_loaders(cfg, rank, world, device, n_flag='--eval_n', from_checkpoint=False):
    """-> train, val and robust-val loaders (the first cfg.eval_n val images; RobustBench's list on ImageNet)
    and build_model's kwargs for the data. cfg.eval_n is capped at the val split's size (clamp_eval_n: n_flag
    set it). from_checkpoint: cfg is a trained run's (its options were announced then)."""
    if cfg.loader not in ('ffcv', 'torchvision'):
        raise UserError(f'unknown --loader={cfg.loader}: use ffcv or torchvision')
    kind, workers = data_kind(cfg.data), min(cfg.workers, len(os.sched_getaffinity(0)))
    if kind == 'fashion':
        return fashion_loaders(cfg, rank, world, device, workers, n_flag, from_checkpoint)
    if cfg.loader == 'torchvision':
        if kind != 'folder':
            raise UserError(f'--loader=torchvision reads an ImageFolder ({cfg.data}/train/<class>/...), '
                            f'not {kind} data: pass --data=IMAGENET_DIR')
        train_path, val_path = os.path.join(cfg.data, 'train'), os.path.join(cfg.data, 'val')
        classes, _ = list_images(train_path)
        _, val_samples = list_images(val_path, classes)
        names = [os.path.relpath(p, val_path).replace(os.sep, '/') for p, _ in val_samples]
        load = functools.partial(torchvision_loader, classes=classes)
    else:
        need_ffcv()
        if kind != 'beton':
            raise UserError(f'{cfg.data!r} holds no train.beton + val.beton: run `make beton '
                            f'IMAGENET={cfg.data}` and pass --data=<its output folder>, or read the JPEGs '
                            'with --loader=torchvision')
        classes = range(int(beton_labels(f'{cfg.data}/train.beton').max()) + 1)
        with open(os.path.join(cfg.data, 'val_files.txt')) as f:
            names = f.read().split('\n')[:-1]
        from ffcv.reader import Reader
        stored = Reader(f'{cfg.data}/val.beton').num_samples
        if len(names) != stored:  # one written without the other
            raise UserError(f'{cfg.data}/val_files.txt names {len(names)} images, val.beton holds {stored}: '
                            f'write both again (make beton)')
        load, train_path, val_path = ffcv_loader, f'{cfg.data}/train.beton', f'{cfg.data}/val.beton'
    # the models' default normalization: ImageNet's mean, std
    info = dict(in_ch=3, num_classes=len(classes), img_size=cfg.res)
    clamp_eval_n(cfg, len(names), rank, n_flag)
    subset = robustbench_indices(names, cfg.eval_n)
    if subset is None:
        subset = list(range(cfg.eval_n))
        if rank == 0:
            warn(f'robust accuracy on the first {len(subset)} val images, not RobustBench\'s list '
                 f'(it needs eval_n <= 5000 and the ImageNet val files): not comparable with the paper')
    aug = augment.from_config(cfg, rank, len(classes), cfg.res, IMAGENET_MEAN, IMAGENET_STD)
    kw = dict(batch_size=cfg.batch_size // world, device=device, res=cfg.res, rank=rank, world=world,
              seed=cfg.seed, workers=workers)
    return (load(train_path, train=True, **aug, **kw), load(val_path, train=False, **kw),
            load(val_path, train=False, indices=subset, **kw), info)
