"""A run: its configuration (one flat Config, named recipes, --key=value), its checkpoints and its
processes (torchrun). Every value is checked here, before any data is read or any model is built; a
bad one ends the program with one line, `error: ...`, and exit status 2 (UserError; see `cli`).
"""
import argparse
import contextlib
import dataclasses
import glob
import importlib
import math
import os
import re
import shutil
import sys

import torch
import torch.distributed as dist

from models import ACTS, build_model, is_model, patch_problem, pretrained_missing, timm_name

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
    gradnorm_impl: str = 'auto'   # auto: fd in float32 with a smooth activation, else exact (double backprop)
    model: str = 'resnet_demo_pool'  # the demo's ResNet; its stem leaves no checkerboard in d loss / d x
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
    init: str = ''                # '' (random) | pretrained (timm's weights) | a checkpoint of ours
    fd_h: float = 1e-4            # finite-difference step of --gradnorm_impl=fd (pixel units)
    res_start: int = 0            # progressive resizing: train res ramps res_start -> res (0 = off)
    mixup: float = 0.0            # Mixup alpha; with --cutmix too, one of the two per batch (p=0.5); 0 = off
    cutmix: float = 0.0           # CutMix alpha; with --mixup too, one of the two per batch (p=0.5); 0 = off
    randaug: str = ''             # RandAugment, timm's spec, e.g. rand-m9-mstd0.5-inc1; '' = off
    reprob: float = 0.0           # random-erasing probability per image (timm's RandomErasing, pixel mode)
    recipe: str = ''              # one of the paper's runs (RECIPES); unset: swinb_gradnorm on ImageNet data
    accum: int = 1                # micro-batches per optimizer step (accumulation); batch_size stays global
    amp: bool = True              # bf16 autocast on CUDA; off: float32 without TF32 (the paper's runs)
    bn_eval: bool = False         # train in eval mode (BatchNorm keeps running stats), as the authors' script
    gn_weights: str = '0.8,1.2'   # GradNorm: weights of CE and of the penalty
    conv: str = 'auto'            # fast (models.Conv2d) | native (nn.Conv2d) | auto: fast for double backward


# ---------------------------------------------------------------- the paper's runs

# Read from the authors' configs (configs_train/, configs_logit/) and run_train.sh (GPUs per run).
# batch_size is global: per-GPU batch x accumulation steps x GPUs; lr is their base lr x batch / 512
# (a --batch_size override rescales it). Their accumulation sums micro-batch gradients, ours
# averages (the same update whatever the split), so their clip 1.0 with 2 steps is our 0.5.
PAPER = dict(weight_decay=0.05, warmup_epochs=5.0, min_lr=1e-5, smoothing=0.1, eps=4 / 255, res=224,
             eval_n=5000, mixup=0.8, cutmix=1.0, randaug='rand-m9-mstd0.5-inc1', reprob=0.25, amp=False,
             act='gelu')
SWINB = dict(PAPER, model='swin_base_patch4_window7_224', init='pretrained', epochs=100, ema=0.9998)
# ResNet-50: stage 1 swaps the activation into timm's pretrained ResNet-50 and fine-tunes it for 4
# epochs (their warm-up lasts 5, so it never ends); stage 2 starts from stage 1's weights. 4 GPUs.
RN50 = dict(PAPER, model='timm/resnet50', batch_size=256, lr=1.25e-3 * 256 / 512, clip=1.0, bn_eval=True)
STAGE1 = dict(RN50, objective='standard', init='pretrained', epochs=4, ema=0.0)
STAGE2 = dict(RN50, objective='gradnorm', init='runs/{data}/timm-resnet50-standard-{act}/ckpt.pt', ema=0.9998)
RECIPES = {
    # the released checkpoints: 77.78 / 51.58 (GradNorm), 76.80 / 35.02 (EdgeReg): clean / AutoAttack 4/255
    'swinb_gradnorm': dict(SWINB, objective='gradnorm', batch_size=608, accum=2, lr=0.625e-3 * 608 / 512,
                           clip=0.5, ramp_epochs=5.0, gn_weights='0.8,1.2', bn_eval=True),  # 7 GPUs (532)
    'swinb_edge': dict(SWINB, objective='edge', batch_size=608, accum=2, lr=0.625e-3 * 608 / 512, clip=0.5,
                       edge_alpha='1,0.09,19'),  # the logit script trains in train mode
    'swinb_pgd': dict(SWINB, objective='pgd', pgd_steps=3, batch_size=512, lr=1.25e-3, clip=math.inf,
                      bn_eval=True),
    'swinb_standard': dict(SWINB, objective='standard', batch_size=592, lr=0.625e-3 * 592 / 512, clip=1.0,
                           bn_eval=True),  # 74 per GPU; the GPU count is not in run_train.sh: 8 assumed
    'rn50_gelu_stage1': dict(STAGE1, act='gelu'),
    # 60.34 / 30.00 (clean / AutoAttack 4/255)
    'rn50_gelu_gradnorm': dict(STAGE2, act='gelu', epochs=83, ramp_epochs=5.0, gn_weights='0.8,1.2'),
    'rn50_relu_stage1': dict(STAGE1, act='relu'),
    'rn50_relu_gradnorm': dict(STAGE2, act='relu', epochs=50, lr=0.625e-3 * 256 / 512, ramp_epochs=10.0,
                               gn_weights='0.5,0.5'),
    'rn50_silu_stage1': dict(STAGE1, act='silu'),  # 128 per GPU on 2 GPUs
    'rn50_silu_gradnorm': dict(STAGE2, act='silu', epochs=50, accum=2, clip=0.5, ramp_epochs=5.0,
                               gn_weights='0.5,0.5'),
}
IMAGENET_DEFAULT = 'swinb_gradnorm'  # --recipe='' on ImageNet-like data: the paper's headline run

finite = lambda v: math.isfinite(v)
# field -> (test, what a good value is); every field of Config has a line
RULES = {
    'objective': (lambda v: v in ('standard', 'gradnorm', 'pgd', 'edge'), 'standard, gradnorm, pgd or edge'),
    'gradnorm_impl': (lambda v: v in ('auto', 'exact', 'fd'), 'auto, exact or fd'),
    'model': (is_model, 'a model of models.py (resnet_demo, resnet50, vit_small, ...) or of timm '
                        '(swin_base_patch4_window7_224, timm/resnet50, ...)'),
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
    'init': (lambda v: v in ('', 'pretrained') or os.path.isfile(v),
             "'' (random), pretrained or a checkpoint file (a recipe's stage 2: run its stage 1 first)"),
    'fd_h': (lambda v: 0 < v <= 0.1, 'in (0, 0.1] (pixel units)'),
    'res_start': (lambda v: v >= 0, '0 (off) or a resolution <= --res'),
    'mixup': (lambda v: finite(v) and v >= 0, "Mixup's alpha, a finite number >= 0 (0: off)"),
    'cutmix': (lambda v: finite(v) and v >= 0, "CutMix's alpha, a finite number >= 0 (0: off)"),
    'randaug': (lambda v: _randaug_spec(v), "'' (off) or timm's RandAugment spec: rand-m9-mstd0.5-inc1, "
                                            "sections m, n, inc (integers), p, mstd"),
    'reprob': (lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    'recipe': (lambda v: v == '' or v in RECIPES, "'' or one of " + ', '.join(RECIPES)),
    'accum': (lambda v: 1 <= v <= 4096, 'at least 1 (and batch_size a multiple of ranks x accum)'),
    'amp': (lambda v: True, 'true or false'),
    'bn_eval': (lambda v: True, 'true or false'),
    'gn_weights': (lambda v: _floats(v, 2) and min(map(float, v.split(','))) >= 0,
                   'two numbers >= 0: CE,penalty'),
    'conv': (lambda v: v in ('auto', 'fast', 'native'), 'auto, fast or native'),
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
    expected = {bool: 'true or false', int: 'an int', float: 'a float'}.get(kind, f'a {kind.__name__}')
    raise UserError(f'--{key}={val}: expected {expected}')


def validate(cfg):
    for key, (ok, what) in RULES.items():
        if not ok(getattr(cfg, key)):
            raise UserError(f'--{key}={getattr(cfg, key)}: must be {what}')
    if cfg.min_lr > cfg.lr:
        raise UserError(f'--min_lr={cfg.min_lr} is above --lr={cfg.lr}: lower it')
    if cfg.res_start > cfg.res:
        raise UserError(f'--res_start={cfg.res_start} is above --res={cfg.res}: lower it, or 0 for no '
                        'resizing')
    if cfg.init == 'pretrained' and not timm_name(cfg.model):
        raise UserError(f'--init=pretrained loads timm\'s weights, but {cfg.model} is a compact model of '
                        'models.py: pass a timm model (e.g. --model=timm/resnet50) or --init=')
    size = 28 if data_kind(cfg.data) == 'fashion' else cfg.res  # Fashion-MNIST: 28 px, whatever --res
    if why := patch_problem(cfg.model, size):
        raise UserError(f'--model={cfg.model} at {size} px: {why}')
    if cfg.init == 'pretrained' and (why := pretrained_missing(cfg.model)):
        raise UserError(f'--init=pretrained: {why}')
    return cfg


def apply_recipe(cfg, given):
    """The recipe's values under the keys not given; lr follows a --batch_size override linearly
    (the authors' rule), and stage 2's init names stage 1's default output folder."""
    recipe = {k: v for k, v in RECIPES[cfg.recipe].items() if k not in given}
    if 'lr' in recipe and 'batch_size' in given:
        recipe['lr'] *= given['batch_size'] / RECIPES[cfg.recipe]['batch_size']
        recipe['min_lr'] = min(recipe['min_lr'], recipe['lr'])  # tiny batches: lr below 1e-5
    cfg = dataclasses.replace(cfg, **recipe)
    if 'init' in recipe and '{' in cfg.init:
        name = os.path.basename(os.path.normpath(cfg.data)) or 'data'
        cfg.init = cfg.init.format(data=name, act=cfg.act)
        stage1 = [r for r, v in RECIPES.items() if r.endswith('_stage1') and v['act'] == cfg.act]
        if not os.path.isfile(cfg.init):
            first = stage1[0] if stage1 else '...'
            raise UserError(f'--recipe={cfg.recipe} starts from stage 1\'s weights, {cfg.init}, not there: '
                            f'run --recipe={first} first with this --data, or pass --init=CHECKPOINT')
    return cfg


def describe_recipe(cfg):
    """The log's first line: the recipe's knobs as resolved, * where the value is not the recipe's."""
    recipe, parts = RECIPES[cfg.recipe], []
    for k in (f.name for f in dataclasses.fields(Config) if f.name in RECIPES[cfg.recipe]):
        now, was = getattr(cfg, k), recipe[k]
        text = f'{now:.4g}' if isinstance(now, float) else str(now)
        parts.append(f'{k}={text}' + ('*' if now != was and '{' not in str(was) else ''))
    return f'recipe {cfg.recipe}: ' + ' '.join(parts)


def parse_config(argv):
    """--key=value ... -> a checked Config. --recipe=NAME fills the keys not given; on ImageNet-like
    data (.beton files or an ImageFolder) without one, the paper's headline run does."""
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
    if 'recipe' not in given and os.path.isdir(cfg.data) and data_kind(cfg.data) != 'fashion':
        cfg.recipe = IMAGENET_DEFAULT  # --recipe= (empty) keeps the plain defaults
    if cfg.recipe in RECIPES:
        cfg = apply_recipe(cfg, given)
    if not cfg.out:
        name = os.path.basename(os.path.normpath(cfg.data)) or 'data'
        cfg.out = os.path.join('runs', name, f'{cfg.model.replace("/", "-")}-{cfg.objective}-{cfg.act}')
    return validate(cfg)


# ---------------------------------------------------------------- checkpoints

def write_failure(e, path):
    """Why a write failed, in a few words: torch.save's zip writer raises RuntimeError, not OSError,
    when the disk fills."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return f'{str(e).splitlines()[0][:120]}; {free / 2 ** 20:.1f} MiB free on its disk'


def save_checkpoint(path, state):
    """Atomic (temp file, fsync, rename): a crash or a full disk mid-write leaves the earlier
    checkpoints as they were, never a truncated file under a valid name, and no temp file."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = write_failure(e, path)
        raise UserError(f'cannot write checkpoint {path!r} ({why}); earlier checkpoints are '
                        'intact: free some disk space or pass --out=DIR, then --resume=auto') from None


def append_line(path, line):
    """Appends line + newline, or nothing: a failed write (a full disk) is cut off again, so the
    file never ends in half a line."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, 'a') as f:
            f.write(line + '\n')
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise UserError(f'cannot write {path!r} ({write_failure(e, path)}): free some disk space, '
                        'then --resume=auto') from None


# what each reader of a checkpoint needs: (key, type); config must name these fields
EVAL_KEYS = (('config', dict), ('model', dict), ('data_info', dict))
RESUME_KEYS = EVAL_KEYS + (('optimizer', dict), ('step', int), ('run', str))
CONFIG_KEYS = ('model', 'act', 'objective', 'eps', 'data')


def load_checkpoint(path, keys=EVAL_KEYS):
    """A checkpoint of ours, checked to hold keys (with their types): refused in one line, never a
    KeyError later."""
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path!r}')
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; a truncated file fails to unzip
        why = 'it holds pickled Python objects, refused by torch.load(weights_only=True)' \
            if 'weights_only' in str(e) else 'it is truncated or corrupt'
        raise UserError(f'cannot load checkpoint {path!r}: {why}') from None
    if not isinstance(ck, dict):
        raise UserError(f'{path} holds a {type(ck).__name__}, not a checkpoint of train.py (a dict)')
    bad = [f'its {k!r} is missing or not a {kind.__name__}'
           for k, kind in keys if not isinstance(ck.get(k), kind)]
    if not bad and 'config' in dict(keys):
        fields = {f.name for f in dataclasses.fields(Config)}
        bad = [f'its config lacks {k!r}' for k in CONFIG_KEYS if k not in ck['config']]
        bad += [f'its config has an unknown key {k!r}' for k in sorted(set(ck['config']) - fields)]
    if bad:
        raise UserError(f'{path} is not a checkpoint of this version of train.py: {bad[0]}')
    return ck


def checkpoints(out, run=None):
    """The checkpoint files in out, oldest first: ckpt-<step>-<run id>.pt, of one run if given."""
    return sorted(glob.glob(os.path.join(out, f'ckpt-*-{run or "*"}.pt')))


def model_from_checkpoint(ck, key='model', path='the checkpoint'):
    """nn.Conv2d whatever --conv trained it (the same state_dict): evaluation differentiates once."""
    cfg = ck['config']
    try:
        model = build_model(cfg['model'], cfg['act'], **ck['data_info'])
        model.load_state_dict(ck[key])
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        why = ' '.join(str(e).split())[:300]
        raise UserError(f'the {key!r} weights of {path} do not fit the {cfg["model"]}/{cfg["act"]} model it '
                        f'names: {why}') from None
    return model


# ---------------------------------------------------------------- processes

def end_distributed():
    """Ends torchrun's process group while Python is fully alive: a gloo worker that frees a
    collective's tensor during interpreter exit aborts the process (docs/speed.md, section 5). DDP gets
    a group of its own (train.start) and torch._dynamo is imported first (setup_distributed), since
    either would keep the default group alive."""
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_distributed():
    """torchrun sets RANK: one process per GPU (NCCL) or per CPU slot (gloo). -> (rank, world, device)"""
    if 'RANK' in os.environ and not dist.is_initialized():
        # imported later, it keeps the default group alive (end_distributed)
        importlib.import_module('torch._dynamo')
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device('cpu')
    return rank, world, device
