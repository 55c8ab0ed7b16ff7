"""A run: its configuration (one flat Config, named recipes, --key=value), its checkpoints and its
processes (torchrun). Shared by train.py, attack.py, characterize.py and data.py; imports only
models.py of this project.

Every value is checked here, before any data is read or any model is built, and a bad one ends the
program with one line, `error: ...`, and exit status 2 (UserError; see `cli`).
"""
import argparse
import dataclasses
import glob
import math
import os
import re
import sys

import torch
import torch.distributed as dist

from models import ACTS, build_model, is_model

__version__ = '0.2.0'


class UserError(Exception):
    """A problem the user can fix: printed as one line, `error: ...`, exit status 2, no traceback."""


def cli(main, argv):
    """Runs main(argv) as a command: a UserError becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`), like every other error here."""

    def error(self, message):
        raise UserError(f'{message} (see --help)')


def checked(kind, ok, what):
    """An argparse type: kind(text), accepted only if ok(value); else `... must be <what>`."""
    def convert(text):
        try:
            value = kind(text)
            good = ok(value)
        except (ValueError, ArithmeticError, UserError):
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f'{text!r} must be {what}')
        return value
    convert.__name__ = kind.__name__
    return convert


def data_kind(path):
    """'beton' (train.beton + val.beton), 'folder' (ImageFolder train/ + val/) or 'fashion'."""
    has = lambda name, test: test(os.path.join(path, name))
    if has('train.beton', os.path.isfile) and has('val.beton', os.path.isfile):
        return 'beton'
    if has('train', os.path.isdir) and has('val', os.path.isdir):
        return 'folder'
    return 'fashion'


# ---------------------------------------------------------------- the configuration

@dataclasses.dataclass
class Config:
    objective: str = 'gradnorm'   # standard | gradnorm | pgd | edge
    gradnorm_impl: str = 'auto'   # auto: fd on the CPU with a smooth activation, else exact (double backprop)
    model: str = 'resnet_demo'
    act: str = 'gelu'             # relu | gelu | silu: GradNorm needs a smooth one
    data: str = '/usr/share/datasets/fashion-mnist'
    epochs: int = 4
    batch_size: int = 128         # global, split over ranks
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    smoothing: float = 0.1        # label smoothing
    clip: float = 1.0             # gradient-norm clipping
    eps: float = 0.1              # L-inf budget in pixel units: GradNorm's eps and the eval's
    ramp_epochs: float = 1.0      # GradNorm alpha: 0 -> 1 over these epochs (paper: 5)
    edge_alpha: str = '1,0.09,19' # EdgeReg alpha = min(a + b*epoch, c)
    pgd_steps: int = 3            # adversarial-training baseline: PGD-k, step 2*eps/k
    ema: float = 0.0              # EMA decay of the weights, 0 = off
    eval_n: int = 1000            # fixed validation subset for PGD accuracy
    eval_steps: int = 20          # PGD steps for the per-epoch robust accuracy
    compile: str = 'auto'         # auto (= on CUDA only) | on | off
    out: str = ''                 # '' = runs/<data>/<model>-<objective>-<act>
    overwrite: bool = False       # start afresh in an --out that holds another run (deletes its checkpoints)
    resume: str = ''              # a checkpoint to continue from, or 'auto': the newest valid one in --out
    ckpt_every: int = 0           # also checkpoint every N steps (0: at epoch ends only)
    keep: int = 3                 # checkpoints of this run kept in --out
    max_bad_steps: int = 5        # non-finite steps in a row before training stops
    seed: int = 0
    loader: str = 'ffcv'          # ffcv | torchvision (fallback for ImageFolder data)
    res: int = 224                # ImageNet training/eval resolution
    workers: int = 8
    init: str = ''                # '' | torchvision: start from torchvision's pretrained weights
    fd_h: float = 1e-3            # finite-difference step of --gradnorm_impl=fd (pixel units)
    res_start: int = 0            # progressive resizing: train res ramps res_start -> res (0 = off)
    mixup: float = 0.0            # Mixup alpha; with --cutmix too, one of the two per batch (p=0.5); 0 = off
    cutmix: float = 0.0           # CutMix alpha; with --mixup too, one of the two per batch (p=0.5); 0 = off
    randaug: str = ''             # RandAugment, timm's spec, e.g. rand-m9-mstd0.5-inc1; '' = off
    reprob: float = 0.0           # random-erasing probability per image (timm's RandomErasing, pixel mode)


# The paper's ImageNet recipe: the defaults when --data is ImageNet (.beton files or an ImageFolder).
# epochs and batch_size are this repo's choice (the recipe scales lr with the global batch).
IMAGENET_RECIPE = dict(model='resnet50', epochs=100, batch_size=1024, weight_decay=0.05, warmup_epochs=5.0,
                       min_lr=1e-5, smoothing=0.1, ema=0.9998, clip=1.0, ramp_epochs=5.0, eps=4 / 255, res=224,
                       eval_n=5000, randaug='rand-m9-mstd0.5-inc1', reprob=0.25)

finite = lambda v: math.isfinite(v)
# field -> (test, what a good value is); every field of Config has a line
RULES = {
    'objective': (lambda v: v in ('standard', 'gradnorm', 'pgd', 'edge'), 'standard, gradnorm, pgd or edge'),
    'gradnorm_impl': (lambda v: v in ('auto', 'exact', 'fd'), 'auto, exact or fd'),
    'model': (is_model, 'a model of models.py (resnet_demo, resnet50, vit_small, ...)'),
    'act': (lambda v: v in ACTS, ', '.join(ACTS)),
    'data': (os.path.isdir, 'an existing folder (run `make data` for the demo\'s Fashion-MNIST)'),
    'epochs': (lambda v: v >= 1, 'at least 1'),
    'batch_size': (lambda v: v >= 1, 'at least 1 (and at least the number of ranks)'),
    'lr': (lambda v: finite(v) and v > 0, 'a positive finite number'),
    'weight_decay': (lambda v: finite(v) and v >= 0, 'a finite number >= 0'),
    'warmup_epochs': (lambda v: finite(v) and v >= 0, 'a finite number >= 0'),
    'min_lr': (lambda v: finite(v) and v >= 0, 'a finite number >= 0'),
    'smoothing': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'clip': (lambda v: v > 0, 'a positive number (inf: no clipping)'),
    'eps': (lambda v: 0 < v <= 1, 'in (0, 1]: pixels are in [0, 1]'),
    'ramp_epochs': (lambda v: finite(v) and v >= 0, 'a finite number >= 0'),
    'edge_alpha': (lambda v: _floats(v, 3), 'three finite numbers a,b,c (alpha = min(a + b*epoch, c))'),
    'pgd_steps': (lambda v: v >= 1, 'at least 1'),
    'ema': (lambda v: 0 <= v < 1, 'in [0, 1): 0 = off, e.g. 0.9998'),
    'eval_n': (lambda v: v >= 1, 'at least 1'),
    'eval_steps': (lambda v: v >= 1, 'at least 1'),
    'compile': (lambda v: v in ('auto', 'on', 'off'), 'auto, on or off'),
    'out': (lambda v: True, 'a folder'),
    'overwrite': (lambda v: True, 'true or false'),
    'resume': (lambda v: v in ('', 'auto') or os.path.isfile(v), "'auto' or an existing checkpoint file"),
    'ckpt_every': (lambda v: v >= 0, 'a number of steps >= 0 (0: at epoch ends only)'),
    'keep': (lambda v: v >= 1, 'at least 1'),
    'max_bad_steps': (lambda v: v >= 1, 'at least 1'),
    'seed': (lambda v: 0 <= v < 2 ** 31, 'in [0, 2^31)'),
    'loader': (lambda v: v in ('ffcv', 'torchvision'), 'ffcv or torchvision'),
    'res': (lambda v: 16 <= v <= 4096, 'in [16, 4096] pixels'),
    'workers': (lambda v: 0 <= v <= 256, 'in [0, 256]'),
    'init': (lambda v: v in ('', 'torchvision'), "'' (random) or torchvision"),
    'fd_h': (lambda v: 0 < v <= 0.1, 'in (0, 0.1] (pixel units)'),
    'res_start': (lambda v: v >= 0, '0 (off) or a resolution <= --res'),
    'mixup': (lambda v: finite(v) and v >= 0, "Mixup's alpha, a finite number >= 0 (0: off)"),
    'cutmix': (lambda v: finite(v) and v >= 0, "CutMix's alpha, a finite number >= 0 (0: off)"),
    'randaug': (lambda v: _randaug_spec(v), "'' (off) or timm's RandAugment spec: rand-m9-mstd0.5-inc1, "
                                            "sections m, n, inc (integers), p, mstd"),
    'reprob': (lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
}
assert set(RULES) == {f.name for f in dataclasses.fields(Config)}, 'every Config field needs a rule'


def _floats(text, n):
    try:
        vals = [float(v) for v in text.split(',')]
    except ValueError:
        return False
    return len(vals) == n and all(map(math.isfinite, vals))


def _randaug_spec(text):
    """'' or a spec timm's rand_augment_transform accepts. Its numeric sections only (timm skips a
    section without digits silently, so a typo would go unnoticed), and no mmax (augment.randaug_transform
    caps the magnitude)."""
    if text == '':
        return True
    if not re.fullmatch(r'rand(-(m|n|inc)\d+|-(p|mstd)\d+(\.\d+)?)*', text):
        return False
    try:
        from timm.data.auto_augment import rand_augment_transform
    except ImportError:
        raise UserError(f'--randaug={text} needs timm: pip install timm==1.0.31') from None
    try:
        rand_augment_transform(text, {})
    except (AssertionError, ValueError):
        return False
    return True


def _convert(key, val, kind):
    """'--key=val' -> a value of the field's type, or UserError naming what it should be."""
    if kind is bool:
        if val.lower() in ('', '1', 'true', 'yes', 'on'):
            return True
        if val.lower() in ('0', 'false', 'no', 'off'):
            return False
    else:
        try:
            return kind(val)
        except ValueError:
            pass
    raise UserError(f'--{key}={val}: expected {"true or false" if kind is bool else "a" + "n" * (kind is int) + " " + kind.__name__}')


def validate(cfg):
    for key, (ok, what) in RULES.items():
        if not ok(getattr(cfg, key)):
            raise UserError(f'--{key}={getattr(cfg, key)}: must be {what}')
    if cfg.min_lr > cfg.lr:
        raise UserError(f'--min_lr={cfg.min_lr} is above --lr={cfg.lr}: lower it')
    if cfg.res_start > cfg.res:
        raise UserError(f'--res_start={cfg.res_start} is above --res={cfg.res}: lower it, or 0 for no resizing')
    if cfg.init and cfg.model != 'resnet50':
        raise UserError(f'--init={cfg.init} loads ImageNet ResNet-50 weights, not {cfg.model}: pass --model=resnet50 or --init=')
    return cfg


def parse_config(argv):
    """--key=value ... -> a checked Config. On ImageNet-like data (.beton files or an ImageFolder)
    the paper's recipe fills the keys not given."""
    cfg, fields, given = Config(), {f.name: f for f in dataclasses.fields(Config)}, {}
    for arg in argv:
        if not arg.startswith('--'):
            raise UserError(f'cannot read {arg!r}: options are --key=value, e.g. --epochs=8')
        key, _, val = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in fields:
            raise UserError(f'unknown option --{key}; known: ' + ' '.join(fields))
        given[key] = _convert(key, val, type(getattr(cfg, key)))
    cfg = dataclasses.replace(cfg, **given)
    if os.path.isdir(cfg.data) and data_kind(cfg.data) != 'fashion':
        recipe = {k: v for k, v in IMAGENET_RECIPE.items() if k not in given}
        if 'lr' not in given:
            recipe['lr'] = 1.25e-3 * given.get('batch_size', IMAGENET_RECIPE['batch_size']) / 512
            recipe['min_lr'] = min(recipe.get('min_lr', cfg.min_lr), recipe['lr'])  # tiny batches: lr below 1e-5
        if 'init' not in given and given.get('model', 'resnet50') == 'resnet50':
            recipe['init'] = 'torchvision'  # the paper fine-tunes torchvision's ResNet-50 with GELU swapped in
        cfg = dataclasses.replace(cfg, **recipe)
    if not cfg.out:
        name = os.path.basename(os.path.normpath(cfg.data)) or 'data'
        cfg.out = os.path.join('runs', name, f'{cfg.model}-{cfg.objective}-{cfg.act}')
    return validate(cfg)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Atomic (temp file, fsync, rename): a crash or a full disk mid-write leaves the earlier
    checkpoints as they were, never a truncated file under a valid name."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise UserError(f'cannot write checkpoint {path!r} ({e.strerror}); earlier checkpoints are '
                        'intact: free some disk space or pass --out=DIR, then --resume=auto') from None


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path!r}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; a truncated file fails to unzip
        why = 'it holds pickled Python objects, refused by torch.load(weights_only=True)' \
            if 'weights_only' in str(e) else 'it is truncated or corrupt'
        raise UserError(f'cannot load checkpoint {path!r}: {why}') from None


def checkpoints(out, run=None):
    """The checkpoint files in out, oldest first: ckpt-<step>-<run id>.pt, of one run if given."""
    return sorted(glob.glob(os.path.join(out, f'ckpt-*-{run or "*"}.pt')))


def model_from_checkpoint(ck, key='model'):
    cfg = ck['config']
    model = build_model(cfg['model'], cfg['act'], **ck['data_info'])
    model.load_state_dict(ck[key])
    return model


# ---------------------------------------------------------------- processes

def setup_distributed():
    """torchrun sets RANK: one process per GPU (NCCL) or per CPU slot (gloo). -> (rank, world, device)"""
    if 'RANK' in os.environ and not dist.is_initialized():
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device('cpu')
    return rank, world, device
