"""The data of train.py and evaluate.py: which loaders (augment.py's) read what, with which augmentation,
from which files and caches. Each loader yields (x, y): x float in [0,1] on the device, channels_last;
y int64 (soft labels with --mixup or --cutmix). `--data` is a Fashion-MNIST IDX folder (the demo) or
CIFAR-10's python version (cifar-10-batches-py/), both cached once as .beton, a folder with train.beton +
val.beton (tools/beton.py writes them), or an ImageFolder (train/<class>/*, val/<class>/*).
"""
import contextlib
import functools
import glob
import gzip
import hashlib
import os
import pickle
import socket

# numba's default threading layer (TBB) can abort at exit, OpenMP's does not (docs/speed.md,
# section 5). Set before numba is imported.
os.environ.setdefault('NUMBA_THREADING_LAYER', 'omp')

import numpy as np
import torch
import torch.distributed as dist

from augment import BatchAugment, Batches, TensorLoader, ffcv_loader, torchvision_loader
from config import CIFAR_FILES, Config, UserError, cifar_dir, data_kind, warn, warn_once
from models import IMAGENET_MEAN, IMAGENET_STD

INSTALL_FFCV = ('install it with `make setup` (= apt-get install pkg-config g++ libturbojpeg0-dev '
                'libopencv-dev; pip install ffcv==1.0.2), or pass --loader=torchvision')
FASHION_MEAN, FASHION_STD = (0.286,), (0.353,)
FASHION_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                   'Ankle boot')
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
# the official release's MD5 of each file, as torchvision's datasets/cifar.py lists them
CIFAR_MD5 = dict(zip(CIFAR_FILES, ['c99cafc152244af753f735de768cd75f', 'd4bba439e000b95fd0a9bffe97cbabec',
                                   '54ebc095f3ab1f0389bbae665268c751', '634d18415352ddfa80567beed471001a',
                                   '482c414d41f54cd18b22e5b47cb7c3cb', '40351d587109b95175f43aff81a1287e']))
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


# ---------------------------------------------------------------- Fashion-MNIST (the demo)

def read_idx(path):
    """One IDX file (the MNIST format): big-endian dims after a 4-byte magic."""
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def fashion_files(root):
    """-> the paths of the four IDX files (train images, labels, test images, labels), or UserError."""
    names = ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
             't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']
    missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise UserError(f'no Fashion-MNIST in {root!r} (missing {missing[0]}): run `make data` '
                        '(apt-get install dataset-fashion-mnist), or pass --data=DIR with train.beton + '
                        'val.beton or an ImageFolder train/ + val/')
    return [os.path.join(root, n) for n in names]


def load_fashion_mnist(root):
    xtr, ytr, xte, yte = map(read_idx, fashion_files(root))
    return (xtr[:, None], ytr.long()), (xte[:, None], yte.long())


def gray_as_rgb(images, labels):
    """FFCV's image field is RGB: each gray image is stored raw (lossless) as 3 equal channels, and the
    loader keeps one, so the model sees exactly the IDX pixels (RGB images: as they are).
    -> [(HxWx3 uint8, label)], for write_split"""
    return list(zip(images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy(), labels.tolist()))


def small_cache(root, kind='fashion'):
    """CACHE/fashion-mnist-<key> (cifar-10-<key>): the key names the source files, their sizes and times,
    so another copy (a test's subset, say) gets its own cache."""
    files = SMALL[kind][1](root)
    stamps = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
    key = hashlib.sha1(repr(stamps).encode())
    return os.path.join(CACHE, f'{SMALL[kind][0].lower()}-{key.hexdigest()[:12]}')


def small_betons(root, workers, kind='fashion'):
    """Fashion-MNIST (CIFAR-10) written once to small_cache(root)/{train,val}.beton (+ .sum: size and
    SHA-256), each checked when opened (damaged: named and written again). -> that folder; None if it cannot
    be written"""
    out = small_cache(root, kind)
    damaged = [s for s in ('train', 'val') if beton_damage(f'{out}/{s}.beton', warn)]
    try:
        if damaged:
            os.makedirs(out, exist_ok=True)
        for split, (x, y) in zip(('train', 'val'), SMALL[kind][2](root) if damaged else ()):
            path = f'{out}/{split}.beton'
            write_split(gray_as_rgb(x, y), path + '.new', workers, write_mode='raw')
            with open(path + '.sum.new', 'w') as f:
                f.write(f'{os.path.getsize(path + ".new")} {file_digest(path + ".new", "sha256")}\n')
            os.replace(path + '.new', path)  # a crash between the two: a .beton without its sum, rebuilt
            os.replace(path + '.sum.new', path + '.sum')
    except OSError as e:
        return warn(f'cannot write the FFCV cache {out} ({e.strerror or e}): the data are read in memory '
                    'instead (XDG_CACHE_HOME: a writable folder to cache it)')
    return out


def cached_small(data, workers, rank, kind='fashion'):
    """The first rank of each node writes the cache (small_betons), the others wait, then check it."""
    first, root = int(os.environ.get('LOCAL_RANK', rank)) == 0, small_cache(data, kind)
    out = small_betons(data, workers, kind) if first else None
    if dist.is_initialized():
        dist.barrier()
    return out if first else None if any(beton_damage(f'{root}/{s}.beton') for s in ('train', 'val')) \
        else root


def file_digest(path, name):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, name).hexdigest()


def beton_damage(path, say=lambda msg: None):
    """Whether path is missing or not the file small_betons wrote (size, SHA-256 in path.sum); say why."""
    try:
        with open(path + '.sum') as f:
            size, digest = f.read().split()
        why = (f'{os.path.getsize(path)} bytes, {size} written' if os.path.getsize(path) != int(size) else
               'its SHA-256 differs from what was written' if file_digest(path, 'sha256') != digest else None)
    except (FileNotFoundError, NotADirectoryError):
        return True  # never written (or a crash before its sum)
    except (OSError, ValueError) as e:
        why = f'its record {path}.sum: {e}'
    if why:
        say(f'{path} is damaged ({why}): writing it again')
    return bool(why)


# ---------------------------------------------------------------- CIFAR-10 (its python version)

def cifar_files(root):
    """-> the paths of the six batch files (data_batch_1..5, test_batch), or UserError naming one missing."""
    paths = [os.path.join(cifar_dir(root) or root, f) for f in CIFAR_FILES]
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f'{p} is missing: CIFAR-10\'s python version has data_batch_1..5 and test_batch '
                            '(cifar-10-python.tar.gz, untarred: docs/data.md)')
    return paths


def cifar_batch(path):
    """One batch file -> (N x 3 x 32 x 32 uint8, N int64 labels), or UserError naming it. Unpickling can run
    code: the standard library's pickle, on files the user supplies (only files you trust)."""
    want = "a pickled dict, b'data' N x 3072 uint8 and b'labels' N ints in 0..9"
    try:
        with open(path, 'rb') as f:
            batch = pickle.load(f, encoding='bytes')  # written by Python 2: byte-string keys
        x, y = batch[b'data'], np.asarray(batch[b'labels'])
    except Exception as e:  # not a pickle, not a dict, a key missing: errors of many types
        why = ' '.join(f'{type(e).__name__}: {e}'.split())[:200]
        raise UserError(f'{path} is not a CIFAR-10 batch file ({why}): expected {want}') from None
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and y.ndim == 1 and y.dtype.kind in 'iu'
            and x.shape == (len(y), 3072) and (not len(y) or 0 <= y.min() <= y.max() <= 9)):
        what = f'data {getattr(x, "shape", type(x).__name__)} {getattr(x, "dtype", "")}, labels {y.shape}'
        raise UserError(f'{path} is not a CIFAR-10 batch file ({what}): expected {want}')
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y.astype(np.int64))


@functools.cache
def cifar_read(stamps):
    """stamps: (path, size, mtime) of each batch file, so a changed file is read again; else once per process.
    -> dict(train=(x, y), test=(x, y), md5=[...]); files other than the official release: one warning."""
    paths = [p for p, _, _ in stamps]
    parts, md5 = [cifar_batch(p) for p in paths], [file_digest(p, 'md5') for p in paths]
    differ = [os.path.basename(p) for p, d in zip(paths, md5) if d != CIFAR_MD5[os.path.basename(p)]]
    if differ and int(os.environ.get('RANK', 0)) == 0:
        warn(f'{os.path.dirname(paths[0])}: {", ".join(differ)} not the official CIFAR-10 release (MD5): '
             f'a subset or a modified copy ({sum(len(y) for _, y in parts[:5])} training images)')
    train = torch.cat([x for x, _ in parts[:5]]), torch.cat([y for _, y in parts[:5]])
    return dict(train=train, test=parts[5], md5=md5)


def cifar10(root):
    """-> dict(train=(images, labels), test=(images, labels), md5=[...]): uint8 N x 3 x 32 x 32, int64."""
    return cifar_read(tuple((p, os.path.getsize(p), os.path.getmtime(p)) for p in cifar_files(root)))


# kind -> the name, the source files (the cache's key), their reader, channels, side, mean, std
SMALL = {'fashion': ('Fashion-MNIST', lambda root: sorted(glob.glob(os.path.join(root, '*-ubyte.gz'))),
                     load_fashion_mnist, 1, 28, FASHION_MEAN, FASHION_STD),
         'cifar': ('CIFAR-10', cifar_files, lambda root: (cifar10(root)['train'], cifar10(root)['test']),
                   3, 32, CIFAR_MEAN, CIFAR_STD)}


# ---------------------------------------------------------------- writing .beton files

def class_folders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def list_images(folder, classes=None):
    """ImageFolder order: sorted classes -> labels 0..C-1, sorted files; with classes (val takes
    train's), folder must have no other class. -> classes, [(path, label)]"""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    # a class train/ lacks: its images would be dropped without a word, or carry labels never trained
    if classes and (extra := sorted(set(class_folders(folder)) - set(classes))):
        raise UserError(f'{os.path.join(folder, extra[0])} is a class folder the {len(classes)} training '
                        f'classes lack ({len(extra)} such): add it to train/ or move it out of {folder}')
    classes = classes or class_folders(folder)
    if not classes:
        raise UserError(f'{folder!r} has no class folders: expected {folder}/<class>/<image>')
    top, samples = os.path.realpath(folder), []
    tops = [os.path.realpath(os.path.join(folder, c)) for c in classes]
    seen = set(tops)  # each real folder once: none is listed under two classes, no link loops
    for label, c in enumerate(classes):
        if (first := tops.index(tops[label])) < label:
            warn(f'{os.path.join(folder, c)} is the folder of class {classes[first]}: skipped')
            continue
        for _, files in sorted(image_dirs(os.path.join(folder, c), IMG_EXTENSIONS, seen, top)):
            samples += [(f, label) for f in files]
    return classes, samples


def image_dirs(path, extensions, seen, top):
    """-> [(folder, its image files by name)] under path, as os.walk(followlinks=True) lists them, but each
    real folder once (seen); a link out of top is named in a warning."""
    found, below = [], []
    for e in sorted(os.scandir(path), key=lambda e: e.name):
        real = os.path.realpath(e.path) if e.is_symlink() or e.is_dir() else None
        if e.is_symlink() and os.path.commonpath([top, real]) != top:
            warn_once(f'{e.path} links out of {top}, to {real}')  # listed again by make_loaders
        if e.is_dir() and real not in seen:
            seen.add(real)
            below += image_dirs(e.path, extensions, seen, top)
        elif e.is_file() and e.name.lower().endswith(extensions):
            found.append(e.path)
    return [(path, found)] + below


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


# ---------------------------------------------------------------- augmentation, from the config

def randaug_transform(spec, res, mean):
    """timm's RandAugment as its create_transform builds it (spec e.g. 'rand-m9-mstd0.5-inc1'), with the
    magnitude capped just below 10: at 10 PosterizeIncreasing keeps 0 bits, which Pillow >= 11 refuses."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    mean = tuple(mean) * (3 // len(mean))  # gray data is augmented as RGB
    return rand_augment_transform(spec, dict(translate_const=int(res * 0.45), interpolation=Image.BICUBIC,
                                             img_mean=tuple(min(255, round(255 * m)) for m in mean),
                                             magnitude_max=10 - 1e-6))


def augmentation(cfg, rank, num_classes, res, mean, std):
    """The training loader's randaug (per image) and on_batch (erasing, Mixup/CutMix), None when off."""
    on_batch = BatchAugment(cfg.seed, rank, num_classes, mean, std, cfg.reprob, cfg.mixup, cfg.cutmix)
    randaug = randaug_transform(cfg.randaug, res, mean) if cfg.randaug else None
    return dict(randaug=randaug, on_batch=on_batch or None)


# ---------------------------------------------------------------- loaders

def beton_labels(path):
    """The label of every sample, from the .beton's metadata table (no image is read)."""
    from ffcv.reader import Reader
    reader = Reader(path)
    return reader.metadata[f'f{list(reader.handlers).index("label")}']


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
    if kind in SMALL:
        return dict(in_ch=SMALL[kind][3], num_classes=10)
    if kind == 'folder':
        return dict(in_ch=3, num_classes=len(class_folders(os.path.join(data, 'train'))))
    need_ffcv()
    return dict(in_ch=3, num_classes=int(beton_labels(f'{data}/train.beton').max()) + 1)


def data_info(cfg):
    """build_model's kwargs for cfg.data, as make_loaders' info will say, read without opening an image."""
    if (kind := data_kind(cfg.data)) in SMALL:
        return dict(data_shape(cfg.data), img_size=SMALL[kind][4], mean=SMALL[kind][5], std=SMALL[kind][6])
    return dict(data_shape(cfg.data), img_size=cfg.res)


def val_size(data):
    """Images in the validation split, from the IDX header, the .beton header or the ImageFolder listing."""
    kind = data_kind(data)
    if kind == 'fashion':
        with gzip.open(fashion_files(data)[3]) as f:
            return int.from_bytes(f.read(8)[4:], 'big')
    if kind == 'cifar':
        return len(cifar10(data)['test'][1])
    if kind == 'folder':
        return len(list_images(os.path.join(data, 'val'), class_folders(os.path.join(data, 'train')))[1])
    need_ffcv()
    from ffcv.reader import Reader
    return Reader(os.path.join(data, 'val.beton')).num_samples


def check_sizes(cfg, train_size, rank, world, n_flag='--eval_n'):
    """--batch_size and --eval_n against the splits' sizes, before any image is read."""
    if train_size // world < cfg.batch_size // world:
        raise UserError(f'--batch_size={cfg.batch_size} is larger than the training set ({cfg.data}, '
                        f'{train_size} images): lower it')
    clamp_eval_n(cfg, val_size(cfg.data), rank, n_flag)


def clamp_eval_n(cfg, size, rank, n_flag):
    """cfg.eval_n at most the size of the validation split, so every later message (the number of
    held-out images) is true; said once if n_flag set it (a default means 'up to': no word)."""
    if cfg.eval_n > size:
        if rank == 0 and n_flag and not (n_flag == '--eval_n' and cfg.eval_n == Config.eval_n):
            warn(f'{n_flag}={cfg.eval_n} is more than the {size} validation images: using all {size}')
        cfg.eval_n = size


def small_loaders(cfg, rank, world, device, workers, n_flag, from_checkpoint, kind):
    """make_loaders on Fashion-MNIST or CIFAR-10: through FFCV (the .beton cache, written once), else in
    memory. CIFAR-10 trains on random crops of its images zero-padded by cfg.pad too, as the field does."""
    name, _, read, channels, side, mean, std = SMALL[kind]
    if cfg.res != Config.res and rank == 0 and not from_checkpoint:
        warn(f'--res={cfg.res} is ignored: {name}\'s images are {side} px and are used as they are')
    info = dict(in_ch=channels, num_classes=10, img_size=side, mean=mean, std=std)
    pad, aug = cfg.pad if kind == 'cifar' else 0, augmentation(cfg, rank, 10, side, mean, std)
    in_memory = cfg.loader == 'torchvision' or ffcv_error()
    root = None if in_memory else cached_small(cfg.data, workers, rank, kind)
    if root is None:
        if cfg.loader == 'ffcv' and ffcv_error() and rank == 0:
            warn(f'FFCV is not importable ({ffcv_error()}); {name} is read in memory instead')
        (xtr, ytr), (xte, yte) = read(cfg.data)
        clamp_eval_n(cfg, len(yte), rank, n_flag)
        train = TensorLoader(xtr, ytr, cfg.batch_size, device, True, cfg.seed, rank, world, aug['randaug'],
                             pad)
        if aug['on_batch']:
            train = Batches(train, device, train.set_epoch, channels, aug['on_batch'])
        val = TensorLoader(xte, yte, 500, device, False, rank=rank, world=world)
        n = cfg.eval_n
        return train, val, TensorLoader(xte[:n], yte[:n], 500, device, False, rank=rank, world=world), info
    from ffcv.reader import Reader
    clamp_eval_n(cfg, Reader(f'{root}/val.beton').num_samples, rank, n_flag)
    kw = dict(device=device, crop=False, rank=rank, world=world, seed=cfg.seed, workers=workers,
              channels=channels)
    return (ffcv_loader(f'{root}/train.beton', cfg.batch_size // world, train=True, pad=pad, **aug, **kw),
            ffcv_loader(f'{root}/val.beton', 500, train=False, **kw),
            ffcv_loader(f'{root}/val.beton', 500, train=False, indices=range(cfg.eval_n), **kw), info)


def make_loaders(cfg, rank, world, device, n_flag='--eval_n', from_checkpoint=False):
    """-> train, val and robust-val loaders (the first cfg.eval_n val images; RobustBench's list on ImageNet)
    and build_model's kwargs for the data. cfg.eval_n is capped at the val split's size (clamp_eval_n: n_flag
    set it). from_checkpoint: cfg is a trained run's (its options were announced then)."""
    if cfg.loader not in ('ffcv', 'torchvision'):
        raise UserError(f'unknown --loader={cfg.loader}: use ffcv or torchvision')
    kind, workers = data_kind(cfg.data), min(cfg.workers, len(os.sched_getaffinity(0)))
    if kind in SMALL:
        return small_loaders(cfg, rank, world, device, workers, n_flag, from_checkpoint, kind)
    if cfg.loader == 'torchvision':
        if kind != 'folder':
            raise UserError(f'--loader=torchvision reads an ImageFolder ({cfg.data}/train/<class>/...), '
                            f'not {kind} data: pass --data=IMAGENET_DIR')
        classes, train_path = list_images(os.path.join(cfg.data, 'train'))  # the loader's [(path, label)]
        _, val_path = list_images(os.path.join(cfg.data, 'val'), classes)
        names = [os.path.relpath(p, os.path.join(cfg.data, 'val')).replace(os.sep, '/') for p, _ in val_path]
        load = torchvision_loader
    else:
        need_ffcv()
        if kind != 'beton':
            raise UserError(f'{cfg.data!r} holds no train.beton + val.beton: run `make beton '
                            f'IMAGENET={cfg.data}` and pass --data=<its output folder>, or read the JPEGs '
                            'with --loader=torchvision')
        classes = range(int(beton_labels(f'{cfg.data}/train.beton').max()) + 1)
        from ffcv.reader import Reader
        stored, names = Reader(f'{cfg.data}/val.beton').num_samples, None  # another tool's: no file names
        with contextlib.suppress(FileNotFoundError), open(os.path.join(cfg.data, 'val_files.txt'),
                                                         errors='surrogateescape') as f:
            names = f.read().split('\n')[:-1]
        if names is not None and len(names) != stored:  # one written without the other
            raise UserError(f'{cfg.data}/val_files.txt names {len(names)} images, val.beton holds {stored}: '
                            f'write both again (make beton)')
        load, train_path, val_path = ffcv_loader, f'{cfg.data}/train.beton', f'{cfg.data}/val.beton'
    info = dict(in_ch=3, num_classes=len(classes), img_size=cfg.res)  # mean, std: the models' (ImageNet's)
    clamp_eval_n(cfg, stored if names is None else len(names), rank, n_flag)
    subset = robustbench_indices(names, cfg.eval_n) if names is not None else None
    if subset is None:
        subset = list(range(cfg.eval_n))
        why = ('it needs eval_n <= 5000 and the ImageNet val files' if names is not None else
               f'{cfg.data} has no val_files.txt, the val images\' names in val.beton\'s order, as '
               'tools/beton.py writes it')
        if rank == 0:
            warn(f'robust accuracy on the first {len(subset)} val images, not RobustBench\'s list ({why}): '
                 'not comparable with the paper')
    aug = augmentation(cfg, rank, len(classes), cfg.res, IMAGENET_MEAN, IMAGENET_STD)
    kw = dict(batch_size=cfg.batch_size // world, device=device, res=cfg.res, rank=rank, world=world,
              seed=cfg.seed, workers=workers)
    return (load(train_path, train=True, **aug, **kw), load(val_path, train=False, **kw),
            load(val_path, train=False, indices=subset, **kw), info)
