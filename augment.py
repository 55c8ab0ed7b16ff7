"""Augmentations whose random numbers are a fixed function of (seed, epoch, sample): the same batches
for any number of loader threads or worker processes, in every run, and after a resume.

No random state is shared or carried along: each random number is a hash of its coordinates
(`uniform`). Flip and random-resized crop are hashed from (seed, epoch, image index), on both loaders
(the FFCV operations in ffcv_ops.py compile the same functions with numba); timm's RandAugment runs
per image with Python's and NumPy's generators seeded from that hash; random erasing and Mixup/CutMix
run on the device batch with torch's generator seeded from (seed, epoch, rank, batch number).
Imports only torch and numpy (timm on first use).
"""
import math
import random
import threading
from contextlib import contextmanager

import numpy as np
import torch

M32 = 0xFFFFFFFF
# streams: which random number of a sample (crop attempt t < 10 uses CROP + 4t .. CROP + 4t + 3);
# STEP + rank seeds a training step's own random numbers, BATCH + rank a batch's (train.py, BatchAugment)
FLIP, RANDAUG, CROP, STEP, BATCH = 0, 1, 2, 1 << 15, 1 << 16
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # ImageNet's random-resized crop


def mix32(h):
    """murmur3's finalizer, a bijection of 32-bit integers that spreads every input bit over the
    output. Masked integer arithmetic: Python ints, int64 tensors and numba's int64 give the same bits
    (products that overflow 64 bits wrap, and their low 32 bits are exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def rand_u32(seed, epoch, index, stream):
    """A 32-bit integer that is a fixed function of four integers in [0, 2^32); index may be an int64 tensor."""
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
    """timm's RandAugment as timm's create_transform builds it: translations up to 45% of the crop,
    fill with the mean colour, bicubic resampling. spec: e.g. 'rand-m9-mstd0.5-inc1'.

    One change: a magnitude drawn above 10 is clipped to just below 10, not to 10. At 10 timm's
    PosterizeIncreasing keeps 0 bits, which Pillow >= 11 refuses (an exception in ~2% of those ops
    with mstd0.5) and older Pillow turned into a black image; below 10 it keeps 1 bit. The other
    ops change by 1e-7 of their range."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    mean = tuple(mean) * (3 // len(mean))  # gray data is augmented as RGB
    return rand_augment_transform(spec, dict(translate_const=int(res * 0.45), interpolation=Image.BICUBIC,
                                             img_mean=tuple(min(255, round(255 * m)) for m in mean),
                                             magnitude_max=10 - 1e-6))


_py_rng = threading.Lock()


@contextmanager
def python_rng(seed):
    """Python's and NumPy's global generators (timm's RandAugment draws from both) seeded, and put
    back after. One thread at a time: the generators are per process, and an FFCV loader thread whose
    epoch was abandoned may still be filling its last batches next to the current one."""
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


# ---------------------------------------------------------------- on the device batch

class BatchAugment:
    """Random erasing per image, then Mixup or CutMix per batch, on the float batch in [0,1]; torch's
    CPU generator seeded by (seed, epoch, rank, batch number) inside fork_rng, so training's own
    random numbers are left as they were.

    Erasing is torchvision's RandomErasing (value='random': the same distribution of boxes and N(0,1)
    noise as timm's mode='pixel'), with the noise in normalized units as timm has it (it erases after
    Normalize): mean + std * N(0,1) in pixel units. Mixup/CutMix are torchvision's v2.MixUp/v2.CutMix,
    one of the two per batch with probability 1/2 when both alphas are set (timm's switch_prob)."""

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
