"""The loaders and their augmentation: ffcv_loader, torchvision_loader (the fallback) and TensorLoader (in
memory); data.py decides which, on what data. Every random number is a hash of its coordinates (`uniform(seed,
epoch, index, stream)`), never shared state: the same batches for any number of loader threads, in every run
and after a resume. Crop and flip run as FFCV operations (compiled by numba), timm's RandAugment per image,
erasing and Mixup/CutMix on the device batch (BatchAugment).
"""
import functools
import math
import random
import threading
import warnings
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from config import UserError, warn

M32 = 0xFFFFFFFF
# streams: which random number of a sample (crop try t < 10: CROP + 4t .. CROP + 4t + 3; PAD, PAD + 1: the
# padded crop's offsets); a training step's are rand_u32(seed, step, rank, STEP) (train.py), a batch's
# rand_u32(seed, epoch, batch, BATCH + rank)
FLIP, RANDAUG, CROP, PAD, STEP, BATCH = 0, 1, 2, 64, 1 << 15, 1 << 16
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # ImageNet's random-resized crop
VAL_RATIO = 224 / 256  # center crop side / short side, the usual ImageNet evaluation crop


def mix32(h):
    """murmur3's finalizer, a bijection of 32-bit integers; masked, so Python ints, int64 tensors and
    numba's int64 give the same bits."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def rand_u32(seed, epoch, index, stream):
    """A 32-bit integer, a fixed function of four integers in [0, 2^32); index may be an int64 tensor."""
    h = mix32(seed ^ 0x243F6A88)
    h = mix32(h ^ epoch)
    h = mix32(h ^ index)
    return mix32(h ^ stream)


def uniform(seed, epoch, index, stream):
    """A number in [0, 1) with 32 random bits, a fixed function of its arguments."""
    return rand_u32(seed, epoch, index, stream) / 4294967296.0


def crop_params(height, width, seed, epoch, index, scale=SCALE, ratio=RATIO):
    """torchvision's RandomResizedCrop.get_params (10 tries of area and log-uniform aspect, else the
    central crop at the nearest allowed aspect), its draws from `uniform`. -> top, left, h, w"""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * uniform(seed, epoch, index, CROP + 4 * t))
        aspect = math.exp(lo + (hi - lo) * uniform(seed, epoch, index, CROP + 4 * t + 1))
        w = int(math.floor(math.sqrt(target * aspect) + 0.5))
        h = int(math.floor(math.sqrt(target / aspect) + 0.5))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(seed, epoch, index, CROP + 4 * t + 2) * (height - h + 1))
            left = int(uniform(seed, epoch, index, CROP + 4 * t + 3) * (width - w + 1))
            return top, left, h, w
    if width < ratio[0] * height:
        w, h = width, int(math.floor(width / ratio[0] + 0.5))
    elif width > ratio[1] * height:
        w, h = int(math.floor(height * ratio[1] + 0.5)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pad_crop(image, pad, seed, epoch, index):
    """HWC image -> a crop of its size from it zero-padded by pad pixels on each side (CIFAR-10's usual
    augmentation), at offsets drawn from (seed, epoch, index)."""
    h, w = image.shape[:2]
    top, left = (rand_u32(seed, epoch, index, PAD + k) % (2 * pad + 1) for k in (0, 1))
    return np.pad(image, ((pad, pad), (pad, pad), (0, 0)))[top:top + h, left:left + w]


# ---------------------------------------------------------------- RandAugment (timm's, per image)


_py_rng = threading.Lock()


@contextmanager
def python_rng(seed):
    """Python's and NumPy's global generators (timm's RandAugment draws from both) seeded, then put back;
    one thread at a time, as the generators are per process."""
    with _py_rng:
        state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def randaug_image(transform, image, seed, epoch, index):
    """RGB uint8 HWC array -> the same, through transform (PIL in, PIL out), seeded by the image."""
    from PIL import Image  # PIL, timm and FFCV are imported on first use
    with python_rng(rand_u32(seed, epoch, index, RANDAUG)):
        return np.array(transform(Image.fromarray(image)))


def per_image(images, seed, epoch, index, pad=0, transform=None):
    """uint8 (B, C, H, W), their indices -> pad_crop (pad > 0), then RandAugment (transform), as FFCV's path;
    gray images as RGB, one channel kept."""
    out = []
    for im, i in zip(images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy(), index.tolist()):
        im = np.ascontiguousarray(pad_crop(im, pad, seed, epoch, i) if pad else im)
        out.append(randaug_image(transform, im, seed, epoch, i) if transform else im)
    return torch.from_numpy(np.stack(out)[..., :images.shape[1]]).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- on the device batch

class TensorLoader:
    """In-memory uint8 images -> float batches in [0,1] on the device, each rank its shard of a
    seeded order; Fashion-MNIST or CIFAR-10 without FFCV (or with --loader=torchvision)."""

    def __init__(self, images, labels, batch_size, device, train, seed=0, rank=0, world=1, randaug=None,
                 pad=0):
        self.images, self.labels, self.train, self.seed, self.randaug = images, labels, train, seed, randaug
        self.device, self.rank, self.world, self.pad = device, rank, world, pad
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
            if self.train:  # flip, then the padded crop and RandAugment, as FFCV's path orders them
                flip = rand_u32(self.seed, self.epoch, j, FLIP) < 2 ** 31  # uniform(...) < 0.5, in integers
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
                if self.randaug or self.pad:
                    x = per_image(x, self.seed, self.epoch, j, self.pad, self.randaug)
            x = x.to(self.device, non_blocking=True).float().div_(255)
            yield x.contiguous(memory_format=torch.channels_last), self.labels[j].to(self.device)


def center(im, res):
    """The central res square, its offset rounded down as FFCV's (T.CenterCrop rounds it to even)."""
    left, top = (im.width - res) // 2, (im.height - res) // 2
    return im.crop((left, top, left + res, top + res))


class BatchAugment:
    """Random erasing per image (torchvision's, timm's N(0,1) noise in normalized units), then Mixup or CutMix
    (1/2 each with both alphas set, timm's switch_prob), seeded by (seed, epoch, rank, batch)."""

    def __init__(self, seed, rank, num_classes, mean, std, reprob=0.0, mixup=0.0, cutmix=0.0):
        from torchvision.transforms import v2
        self.seed, self.rank, self.reprob = seed, rank, reprob
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + \
                 ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
        self.mix = v2.RandomChoice(mixers) if len(mixers) == 2 else (mixers or [None])[0]

    def __bool__(self):
        return bool(self.reprob or self.mix)

    def erase(self, x):
        from torchvision.transforms import RandomErasing
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        for img in x:
            if torch.rand(1) < self.reprob:  # RandomErasing.forward's test, then its box and noise
                top, left, h, w, v = RandomErasing.get_params(img, (0.02, 1 / 3), (0.3, 1 / 0.3), value=None)
                if h < img.shape[1]:  # else no box fitted in 10 tries: v is the image itself
                    img[:, top:top + h, left:left + w] = v.to(x.device) * std + mean

    def __call__(self, x, y, epoch, batch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rand_u32(self.seed, epoch, batch, BATCH + self.rank))
            if self.reprob:
                self.erase(x)
            if self.mix:
                x, y = self.mix(x, y)
        return x, y


# ---------------------------------------------------------------- the loaders

def load_rgb(path, draft=None):
    """Any file PIL can decode (by content: a PNG named .JPEG too) -> RGB; alpha is composited over white.
    draft: the JPEG decoder may shrink by 2/4/8 (exact DCT scaling, fast) while both sides stay >= draft."""
    from PIL import Image
    with Image.open(path) as im:
        if draft:
            im.draft('RGB', (draft, draft))
        if im.mode.startswith('I'):  # 16-bit gray (I;16*, or I as PNG's open): 0..65535 scaled, not clipped
            im = Image.fromarray(((np.asarray(im, np.int64) + 128) // 257).clip(0, 255).astype(np.uint8))
        if im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info:
            rgba = im.convert('RGBA')
            white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert('RGB')
        return im.convert('RGB')


class Batches:
    """(uint8 or [0,1] float NCHW, labels) -> x float in [0,1] on the device, channels_last, y int64, then
    on_batch (BatchAugment). From FFCV on the CPU, x is its buffer: valid until the next batch."""

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


def ffcv_loader(path, batch_size, device, train, res=224, crop=True, rank=0, world=1, seed=0, workers=2,
                indices=None, channels=3, randaug=None, on_batch=None, pad=0):
    """train: shuffled (DDP: each rank its shard), random-resized crop + flip (+ pad_crop, randaug), each a
    function of (seed, epoch, image index) (ffcv_ops); val: center crop, in order, each rank every world-th
    of indices (default: all). crop=False: fixed-size images as stored. FFCV must import (data.need_ffcv)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    SeededRandomResizedCrop, SeededFlip, PerImage = ffcv_ops()
    if not crop:
        decoder = SimpleRGBImageDecoder()
    elif train:
        decoder = SeededRandomResizedCrop(seed, (res, res))
    else:
        decoder = CenterCropRGBImageDecoder((res, res), VAL_RATIO)
    python = ([PerImage(seed, functools.partial(pad_crop, pad=pad))] if pad else []) + \
             ([PerImage(seed, functools.partial(randaug_image, randaug))] if randaug is not None else [])
    augs = [SeededFlip(seed)] + python if train else []
    device = torch.device(device)
    # GPU: uint8 to the device, float there (a quarter of the bytes). CPU: / 255 in FFCV's threads, into
    # buffers it reuses; not after RandAugment or the padded crop (Python), which FFCV 1.0.2 cannot put
    # before a compiled op (docs/data.md, Loader speed)
    on_device = [ToTensor(), ToDevice(device, non_blocking=True)]
    if device.type == 'cpu' and not (python and train):
        on_device = [NormalizeImage(np.zeros(3), np.full(3, 255.0), np.float32), ToTensor()]
    image = [decoder] + augs + on_device + [ToTorchImage(channels_last=True)]
    label = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    size = Reader(path).num_samples
    if indices is not None and len(indices) and not 0 <= min(indices) <= max(indices) < size:
        # FFCV would read past the end: phantom samples, junk labels
        raise ValueError(f'{path} holds samples 0..{size - 1}, not {min(indices)}..{max(indices)}')
    if not train:  # not distributed=True: DistributedSampler pads with repeats, which would bias accuracy
        indices = np.asarray(range(size) if indices is None else indices)[rank::world]
    loader = Loader(path, batch_size, num_workers=workers, os_cache=True, order=order, seed=seed,
                    distributed=train and world > 1, indices=indices, drop_last=train,
                    pipelines={'image': image, 'label': label})
    seeded = [op for op in [decoder] + augs if isinstance(op, Seeded)]

    def set_epoch(epoch):
        loader.next_epoch = epoch  # FFCV's order is a function of seed + epoch
        for op in seeded:
            op.epoch = epoch
    return Batches(loader, device, set_epoch, channels, on_batch)


class _Folder(torch.utils.data.Dataset):
    """[(path, label)] -> (transform(image), label); an undecodable image is named and the next one used."""

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


def torchvision_loader(samples, batch_size, device, train, res=224, rank=0, world=1, seed=0, workers=2,
                       indices=None, randaug=None, on_batch=None):
    """[(path, label)] (data.list_images) through torchvision's transforms (train: random-resized crop, flip,
    RandAugment; val: ImageNet's center crop) in a DataLoader, DistributedSampler's order under DDP."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from torchvision import transforms as T
    if train:
        tf = [T.RandomResizedCrop(res), T.RandomHorizontalFlip()] + ([randaug] if randaug else [])
        dataset = _Folder(samples, T.Compose(tf + [T.PILToTensor()]))
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
    else:
        crop = functools.partial(center, res=res)
        tf = T.Compose([T.Resize(round(res / VAL_RATIO)), crop, T.PILToTensor()])
        idx = range(len(samples)) if indices is None else indices
        dataset, sampler = Subset(_Folder(samples, tf), list(idx)[rank::world]), None
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                        pin_memory=torch.device(device).type == 'cuda', persistent_workers=workers > 0)
    return Batches(loader, torch.device(device), sampler.set_epoch if train else (lambda epoch: None),
                   on_batch=on_batch)


# ---------------------------------------------------------------- the same rules as FFCV operations
# FFCV's own RandomHorizontalFlip and RandomResizedCropRGBImageDecoder draw from numba's per-thread
# generators, which no seed reaches. numba freezes the Python values a compiled function refers to,
# so the epoch, which changes after compilation, is read once per batch in object mode.

@functools.cache
def ffcv_ops():
    """-> SeededRandomResizedCrop(seed, output_size), SeededFlip(seed), PerImage(seed, fn): the
    mixins below on FFCV's bases, built on first use, this file's random functions callable from numba."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.pipeline.operation import Operation
    from numba.core.errors import NumbaWarning
    from numba.extending import register_jitable
    for fn in (mix32, rand_u32, uniform, crop_params):
        register_jitable(fn)  # callable from compiled code; from Python, still the plain function
    # object mode holds the GIL for the epoch read only; the loops after it run in parallel
    warnings.filterwarnings('ignore', "Code running in object mode won't allow parallel", NumbaWarning)
    return (type('SeededRandomResizedCrop', (_Crop, RandomResizedCropRGBImageDecoder), {}),
            type('SeededFlip', (_Flip, Operation), {}), type('PerImage', (_PerImage, Operation), {}))


class Seeded:
    """seed fixed, epoch set by the loader before each epoch; other arguments go to the FFCV base."""

    def __init__(self, seed, *args):
        self.seed, self.epoch = seed, 0
        super().__init__(*args)


class _Crop(Seeded):
    """FFCV's random-resized-crop decoder with the crop from crop_params; its decode loop restated, as
    FFCV passes its crop function the image size only."""

    def generate_code(self):
        import numba
        from ffcv.fields.rgb_image import IMAGE_MODES
        from ffcv.libffcv import imdecode, resize_crop
        from ffcv.pipeline.compiler import Compiler
        mem_read, my_range, jpg = self.memory_read, Compiler.get_iterator(), IMAGE_MODES['jpg']
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        seed, scale, ratio, read = self.seed, tuple(self.scale), tuple(self.ratio), lambda: self.epoch

        def decode(batch_indices, my_storage, metadata, storage_state):
            with numba.objmode(epoch='int64'):
                epoch = read()
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field['data_ptr'], storage_state)
                height, width = np.uint32(field['height']), np.uint32(field['width'])
                if field['mode'] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = crop_params(np.int64(height), np.int64(width), seed, epoch, np.int64(source_ix),
                                         scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]
        decode.is_parallel = True
        return decode


class _Flip(Seeded):
    """Horizontal flip with probability 1/2, decided by uniform(seed, epoch, index, FLIP)."""

    def generate_code(self):
        import numba
        from ffcv.pipeline.compiler import Compiler
        my_range, seed, read = Compiler.get_iterator(), self.seed, lambda: self.epoch

        def flip(images, dst, indices):
            with numba.objmode(epoch='int64'):
                epoch = read()
            for i in my_range(images.shape[0]):
                if uniform(seed, epoch, np.int64(indices[i]), FLIP) < 0.5:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst
        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state):
        from ffcv.pipeline.allocation_query import AllocationQuery
        alloc = AllocationQuery(previous_state.shape, previous_state.dtype)
        return replace(previous_state, jit_mode=True), alloc


class _PerImage(Seeded):
    """fn(image, seed, epoch, index) on each decoded image (RandAugment, pad_crop), in plain Python."""

    def __init__(self, seed, fn):
        super().__init__(seed)
        self.fn = fn

    def generate_code(self):
        def apply(images, dst, indices):
            for k in range(len(indices)):
                dst[k] = self.fn(images[k], seed=self.seed, epoch=self.epoch, index=int(indices[k]))
            return dst
        apply.with_indices = True
        return apply

    def declare_state_and_memory(self, previous_state):
        from ffcv.pipeline.allocation_query import AllocationQuery
        alloc = AllocationQuery(previous_state.shape, previous_state.dtype)
        return replace(previous_state, jit_mode=False), alloc
