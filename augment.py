"""Training augmentations. Every random number is a hash of its coordinates (`uniform(seed, epoch, index,
stream)`), never drawn from shared state: the same batches for any number of loader threads, in every
run and after a resume. Crop and flip run as FFCV operations (the end of this file, compiled by numba),
timm's RandAugment per image under generators seeded by that hash, erasing and Mixup/CutMix on the
device batch (BatchAugment). PIL, timm and FFCV are imported on first use.
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

M32 = 0xFFFFFFFF
# streams: which random number of a sample (crop attempt t < 10 uses CROP + 4t .. CROP + 4t + 3);
# STEP + rank seeds a training step's own random numbers, BATCH + rank a batch's (train.py, BatchAugment)
FLIP, RANDAUG, CROP, STEP, BATCH = 0, 1, 2, 1 << 15, 1 << 16
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


# ---------------------------------------------------------------- RandAugment (timm's, per image)

def randaug_transform(spec, res, mean):
    """timm's RandAugment as its create_transform builds it (spec e.g. 'rand-m9-mstd0.5-inc1'), with the
    magnitude capped just below 10: at 10 PosterizeIncreasing keeps 0 bits, which Pillow >= 11 refuses."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    mean = tuple(mean) * (3 // len(mean))  # gray data is augmented as RGB
    return rand_augment_transform(spec, dict(translate_const=int(res * 0.45), interpolation=Image.BICUBIC,
                                             img_mean=tuple(min(255, round(255 * m)) for m in mean),
                                             magnitude_max=10 - 1e-6))


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
    from PIL import Image
    with python_rng(rand_u32(seed, epoch, index, RANDAUG)):
        return np.array(transform(Image.fromarray(image)))


def randaug_gray(transform, images, seed, epoch, index):
    """uint8 (B, 1, H, W), their indices -> through RandAugment as RGB, one channel kept (as FFCV's path)."""
    rgb = np.repeat(images[:, 0, :, :, None].numpy(), 3, axis=3)
    out = [randaug_image(transform, im, seed, epoch, int(i))[:, :, :1] for im, i in zip(rgb, index)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- on the device batch

class BatchAugment:
    """Random erasing per image, then Mixup or CutMix per batch, under a generator seeded by (seed, epoch,
    rank, batch). Erasing is torchvision's RandomErasing with timm's noise (N(0,1) in normalized units);
    with both alphas set, Mixup or CutMix with probability 1/2 each (timm's switch_prob)."""

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

def from_config(cfg, rank, num_classes, res, mean, std):
    """The training loader's randaug (per image) and on_batch (erasing, Mixup/CutMix), None when off."""
    on_batch = BatchAugment(cfg.seed, rank, num_classes, mean, std, cfg.reprob, cfg.mixup, cfg.cutmix)
    randaug = randaug_transform(cfg.randaug, res, mean) if cfg.randaug else None
    return dict(randaug=randaug, on_batch=on_batch or None)


# ---------------------------------------------------------------- the same rules as FFCV operations
# FFCV's own RandomHorizontalFlip and RandomResizedCropRGBImageDecoder draw from numba's per-thread
# generators, which no seed reaches. numba freezes the Python values a compiled function refers to,
# so the epoch, which changes after compilation, is read once per batch in object mode.

@functools.cache
def ffcv_ops():
    """-> SeededRandomResizedCrop(seed, output_size), SeededFlip(seed), RandAugment(seed, transform): the
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
            type('SeededFlip', (_Flip, Operation), {}), type('RandAugment', (_RandAug, Operation), {}))


class Seeded:
    """seed fixed, epoch set by the loader before each epoch; other arguments go to the FFCV base."""

    def __init__(self, seed, *args):
        self.seed, self.epoch = seed, 0
        super().__init__(*args)

    def epoch_reader(self):
        return lambda: self.epoch


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
        seed, scale, ratio, read = self.seed, tuple(self.scale), tuple(self.ratio), self.epoch_reader()

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
        my_range, seed, read = Compiler.get_iterator(), self.seed, self.epoch_reader()

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


class _RandAug(Seeded):
    """A PIL transform (timm's RandAugment) on each decoded image, seeded by its index, in plain Python."""

    def __init__(self, seed, transform):
        super().__init__(seed)
        self.transform = transform

    def generate_code(self):
        def randaug(images, dst, indices):
            for k in range(len(indices)):
                dst[k] = randaug_image(self.transform, images[k], self.seed, self.epoch, int(indices[k]))
            return dst
        randaug.with_indices = True
        return randaug

    def declare_state_and_memory(self, previous_state):
        from ffcv.pipeline.allocation_query import AllocationQuery
        alloc = AllocationQuery(previous_state.shape, previous_state.dtype)
        return replace(previous_state, jit_mode=False), alloc
