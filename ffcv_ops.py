"""FFCV operations whose random numbers are a fixed function of (seed, epoch, image index), from
augment.py: the same batches for any number of threads, in every run and after a resume. FFCV's own
RandomHorizontalFlip and RandomResizedCropRGBImageDecoder draw from numba's per-thread generators,
which no seed reaches (libffcv/ffcv issues #164, #300, #392). Imported by data.ffcv_loader only:
importing FFCV takes seconds.

numba freezes the Python values a compiled function refers to, so the epoch, which changes after
compilation, is read once per batch in object mode (`numba.objmode`: the GIL for a few microseconds).
"""
import warnings
from dataclasses import replace

import numba
import numpy as np
from numba.core.errors import NumbaWarning
from numba.extending import register_jitable
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

from augment import FLIP, crop_params, mix32, rand_u32, randaug_image, uniform

for fn in (mix32, rand_u32, uniform, crop_params):
    register_jitable(fn)  # callable from compiled code; from Python, still the plain function
# object mode holds the GIL for the epoch read only; the loops after it run in parallel
warnings.filterwarnings('ignore', "Code running in object mode won't allow parallel", NumbaWarning)


class Seeded:
    """seed fixed at construction, epoch set by the loader's set_epoch before each epoch."""

    def __init__(self, seed):
        self.seed, self.epoch = seed, 0

    def epoch_reader(self):
        return lambda: self.epoch


class SeededRandomResizedCrop(Seeded, RandomResizedCropRGBImageDecoder):
    """FFCV's random-resized-crop decoder (decode, crop, cv2 INTER_AREA resize into the output),
    the crop from augment.crop_params. The decode loop is FFCV's, restated: its crop function is
    called with the image size only, and here it needs the image index and the epoch."""

    def __init__(self, output_size, seed):
        Seeded.__init__(self, seed)
        RandomResizedCropRGBImageDecoder.__init__(self, output_size)

    def generate_code(self):
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
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = crop_params(np.int64(height), np.int64(width), seed, epoch, np.int64(source_ix),
                                         scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]
        decode.is_parallel = True
        return decode


class SeededFlip(Seeded, Operation):
    """Horizontal flip with probability 1/2, decided by augment.uniform(seed, epoch, index, FLIP)."""

    def __init__(self, seed):
        Seeded.__init__(self, seed)
        Operation.__init__(self)

    def generate_code(self):
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
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class RandAugment(Seeded, Operation):
    """A PIL transform (timm's RandAugment) on each decoded HWC image, seeded by its index: plain
    Python in FFCV's loader thread, one image after another."""

    def __init__(self, transform, seed):
        Seeded.__init__(self, seed)
        Operation.__init__(self)
        self.transform = transform

    def generate_code(self):
        def randaug(images, dst, indices):
            for k in range(len(indices)):
                dst[k] = randaug_image(self.transform, images[k], self.seed, self.epoch, int(indices[k]))
            return dst
        randaug.with_indices = True
        return randaug

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False), AllocationQuery(previous_state.shape, previous_state.dtype)
