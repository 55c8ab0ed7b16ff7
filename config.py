"""A run: its configuration (one flat Config, named recipes, --key=value), its processes (torchrun) and stop
signals; its folder and checkpoints are checkpoint.py's. Every value is checked before any data is read;
a bad one ends the program with one line, `error: ...`, exit status 2."""
import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import math
import os
import re
import runpy
import signal
import sys

import torch
import torch.distributed as dist

from models import ACTS, is_model, timm_name

__version__ = '0.2.0'


class UserError(Exception):
    """A problem the user can fix: printed as one line, `error: ...`, exit status 2, no traceback."""


def say(line, file=None):
    """line on a line of its own: on a terminal, a progress bar drawn there (any rank's) is cleared first."""
    file = file or sys.stderr
    print(('\r\033[K' if file.isatty() else '') + line, file=file, flush=True)


def warn(msg):
    say(f'warning: {msg}')


warn_once = functools.cache(warn)


def cli(main, argv):
    """Runs main(argv) as a command: a UserError becomes one line on stderr and exit status 2, a stop
    signal one line and 75 (130 for Ctrl-C)."""
    try:
        return main(argv)
    except UserError as e:
        say(f'error: {e}')
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or Stopped (a stop signal): rank 0 says it
        signum = getattr(e, 'signum', signal.SIGINT)
        if int(os.environ.get('RANK', 0)) == 0:
            say(f'interrupted: {e or "stopped"}' if signum == signal.SIGINT else
                f'preempted: {signal.Signals(signum).name}: {e}')
        return 130 if signum == signal.SIGINT else 75  # 75: EX_TEMPFAIL, requeue it


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`), like every other error; --help shows defaults."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **{**kw, 'formatter_class': HelpFormatter})

    def error(self, message):
        raise UserError(f'{message} (see --help)')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's default after its meaning, unless the meaning says it."""

    def _get_help_string(self, action):
        text, default = action.help or '', action.default
        unset = any(default is v for v in (None, False, argparse.SUPPRESS))
        if 'default' in text or unset or not action.option_strings:
            return text
        return f'{text} (default: {" ".join(map(str, default)) if isinstance(default, list) else default})'


def print_help(doc):
    """train.py --help: each option, its default and its meaning, read from Config's own source (its same-line
    comments), grouped as its `# --` lines group them. -> 0"""
    print(doc.strip() + '\n\noptions, --key=value (a boolean alone, --key, means true):')
    for line in inspect.getsource(Config).splitlines():
        if m := re.fullmatch(r'\s+# -- (.+)', line):
            print(f'\n{m[1]}:')
        elif m := re.match(r'\s+(\w+): \w+ = .*?\s+# (.+)', line):
            print(f'  {"--" + m[1] + "=" + (str(getattr(Config, m[1])) or chr(39) * 2):<32} {m[2]}')
    return 0


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


CIFAR_FILES = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']  # CIFAR-10's python version


def cifar_dir(path):
    """The folder of CIFAR-10's batch files: path itself (cifar-10-batches-py/ or a folder with any of its
    files: a missing one is then named) or its cifar-10-batches-py/; else None."""
    if os.path.basename(os.path.normpath(path)) == 'cifar-10-batches-py' or any(
            os.path.exists(os.path.join(path, f)) for f in CIFAR_FILES + ['batches.meta']):
        return path
    inner = os.path.join(path, 'cifar-10-batches-py')
    return inner if os.path.isdir(inner) else None


def data_kind(path):
    """'beton' (train.beton + val.beton), 'folder' (ImageFolder train/ + val/), 'cifar' (cifar_dir) or
    'fashion'."""
    has = lambda name, test: test(os.path.join(path, name))
    if has('train.beton', os.path.isfile) and has('val.beton', os.path.isfile):
        return 'beton'
    if has('train', os.path.isdir) and has('val', os.path.isdir):
        return 'folder'
    return 'cifar' if cifar_dir(path) else 'fashion'


# ---------------------------------------------------------------- the configuration

@dataclasses.dataclass
class Config:
    # -- the method
    objective: str = 'gradnorm'   # standard | gradnorm | pgd | fgsm (FGSM-RS) | edge
    eps: float = 0.1              # L-inf budget in pixel units: GradNorm's eps and the eval's
    ramp_epochs: float = 1.0      # GradNorm alpha: 0 -> 1 over these epochs (paper: 5)
    gn_weights: str = '0.8,1.2'   # GradNorm: weights of CE and of the penalty
    gradnorm_impl: str = 'auto'   # auto: fd in float32 with a smooth activation, else exact (double backprop)
    fd_h: float = 1e-4            # finite-difference step of --gradnorm_impl=fd (pixel units)
    edge_alpha: str = '1,0.09,19' # EdgeReg alpha = min(a + b*epoch, c)
    pgd_steps: int = 3            # adversarial-training baseline: PGD-k, step 2*eps/k
    recipe: str = ''              # one of the paper's runs (RECIPES); unset: swinb_gradnorm on ImageNet data
    # -- the model
    model: str = 'resnet_demo_pool'  # the demo's ResNet; its stem leaves no checkerboard in d loss / d x
    act: str = 'gelu'             # relu | gelu | silu: GradNorm needs a smooth one
    init: str = ''                # '' (random) | pretrained (timm's) | a checkpoint of ours | a state_dict
    conv: str = 'auto'            # fast (models.Conv2d) | native (nn.Conv2d) | auto: fast for double backward
    # -- optimization
    epochs: int = 4               # passes over the training set
    batch_size: int = 128         # global, split over ranks
    accum: int = 1                # micro-batches per optimizer step (accumulation); batch_size stays global
    lr: float = 2e-3              # AdamW's peak learning rate, after warm-up
    min_lr: float = 1e-5          # the cosine decay's end
    warmup_epochs: float = 1.0    # linear warm-up from 0
    weight_decay: float = 0.05    # AdamW's, on all but norms and biases
    smoothing: float = 0.1        # label smoothing
    clip: float = 1.0             # gradient-norm clipping
    ema: float = 0.0              # EMA decay of the weights, 0 = off
    bn_eval: bool = False         # train in eval mode (BatchNorm keeps running stats), as the authors' script
    amp: bool = True              # bf16 autocast on CUDA; off: float32 without TF32 (the paper's runs)
    compile: str = 'auto'         # auto (= on CUDA only) | on | off
    max_bad_steps: int = 5        # non-finite steps in a row before training stops
    seed: int = 0                 # data order, augmentation, initial weights, attacks' starts
    # -- data and augmentation
    data: str = '/usr/share/datasets/fashion-mnist'  # Fashion-MNIST, CIFAR-10, train+val .beton, ImageFolder
    loader: str = 'ffcv'          # ffcv | torchvision (fallback for ImageFolder data)
    res: int = 224                # ImageNet training/eval resolution
    workers: int = 8              # data-loading workers
    mixup: float = 0.0            # Mixup alpha; with --cutmix too, one of the two per batch (p=0.5); 0 = off
    cutmix: float = 0.0           # CutMix alpha; with --mixup too, one of the two per batch (p=0.5); 0 = off
    randaug: str = ''             # RandAugment, timm's spec, e.g. rand-m9-mstd0.5-inc1; '' = off
    reprob: float = 0.0           # random-erasing probability per image (timm's RandomErasing, pixel mode)
    pad: int = 4                  # CIFAR-10: random crops of the image zero-padded by this many px; 0 = off
    # -- evaluation after each epoch
    eval_n: int = 1000            # fixed validation subset for PGD accuracy
    eval_steps: int = 20          # PGD steps for the per-epoch robust accuracy
    # -- the run folder
    out: str = ''                 # '' = runs/<data>/<model>-<objective>-<act>
    overwrite: bool = False       # start afresh in an --out that holds another run (deletes its checkpoints)
    resume: str = ''              # a checkpoint to continue from, or 'auto': the newest valid one in --out
    resume_changes: str = ''      # settings a resume may change, e.g. lr,batch_size,data (else refused)
    ckpt_every: int = 0           # also checkpoint every N steps (0: at epoch ends only)
    keep: int = 3                 # checkpoints of this run kept in --out

# ---------------------------------------------------------------- the paper's runs

# named recipes, each a small dict of the fields above, in a file of their own like nanoGPT's presets
RECIPES = runpy.run_path(os.path.join(os.path.dirname(__file__) or '.', 'recipes', 'paper.py'))['RECIPES']
IMAGENET_DEFAULT = 'swinb_gradnorm'  # --recipe='' on ImageNet-like data: the paper's headline run

finite = math.isfinite
# settings that leave what a run means alone: a resume may change them freely; the others it compares
FREE = {'out', 'overwrite', 'resume', 'resume_changes', 'ckpt_every', 'keep', 'max_bad_steps', 'compile',
        'workers', 'loader', 'eval_n', 'eval_steps', 'conv', 'gradnorm_impl', 'amp', 'accum', 'init',
        'recipe', 'data'}  # the data: compared by checkpoint.identity; 'data' stands for their size
CHANGEABLE = {f.name for f in dataclasses.fields(Config)} - FREE - {'model', 'epochs'} | {'data'}


def changed(old, cfg):
    """-> [(key, old value, new value)] of the settings that are not FREE and differ from a checkpoint's."""
    now = dataclasses.asdict(cfg)
    return [(k, old.get(k, getattr(Config, k)), v) for k, v in now.items() if k not in FREE
            and old.get(k, getattr(Config, k)) != v]
# field -> (test, what a good value is); every field of Config but the four any value of its type fits
RULES = {
    'objective': (lambda v: v in ('standard', 'gradnorm', 'pgd', 'fgsm', 'edge'),
                  'standard, gradnorm, pgd, fgsm or edge'),
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
    'eps': (lambda v: 0 < v <= 1, 'a finite number in (0, 1]: pixels are in [0, 1]'),
    'ramp_epochs': (lambda v: finite(v) and v >= 0, 'a finite number >= 0'),
    'edge_alpha': (lambda v: _floats(v, 3), 'three finite numbers a,b,c (alpha = min(a + b*epoch, c))'),
    'pgd_steps': (lambda v: v >= 1, 'at least 1'),
    'ema': (lambda v: 0 <= v < 1, 'in [0, 1): 0 = off, e.g. 0.9998'),
    'eval_n': (lambda v: v >= 1, 'at least 1'),
    'eval_steps': (lambda v: v >= 1, 'at least 1'),
    'compile': (lambda v: v in ('auto', 'on', 'off'), 'auto, on or off'),
    'resume': (lambda v: v in ('', 'auto') or os.path.exists(v), "'auto' or an existing checkpoint file"),
    'resume_changes': (lambda v: set(v.split(',')) <= CHANGEABLE | {''},
                       'settings a resume may change, comma-separated: ' + ','.join(sorted(CHANGEABLE))),
    'ckpt_every': (lambda v: v >= 0, 'a number of steps >= 0 (0: at epoch ends only)'),
    'keep': (lambda v: v >= 1, 'at least 1'),
    'max_bad_steps': (lambda v: v >= 1, 'at least 1'),
    'seed': (lambda v: 0 <= v < 2 ** 31, 'in [0, 2^31)'),
    'loader': (lambda v: v in ('ffcv', 'torchvision'), 'ffcv or torchvision'),
    'res': (lambda v: 16 <= v <= 4096, 'in [16, 4096] pixels'),
    'workers': (lambda v: 0 <= v <= 256, 'in [0, 256]'),
    'init': (lambda v: v in ('', 'pretrained') or os.path.exists(v),
             "'' (random), pretrained or a checkpoint file (a recipe's stage 2: run its stage 1 first)"),
    'fd_h': (lambda v: 0 < v <= 0.1, 'in (0, 0.1] (pixel units)'),
    'mixup': (lambda v: finite(v) and v >= 0, "Mixup's alpha, a finite number >= 0 (0: off)"),
    'cutmix': (lambda v: finite(v) and v >= 0, "CutMix's alpha, a finite number >= 0 (0: off)"),
    'randaug': (lambda v: _randaug_spec(v), "'' (off) or timm's RandAugment spec: rand-m9-mstd0.5-inc1, "
                                            "sections m, n, inc (integers), p, mstd"),
    'reprob': (lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    'pad': (lambda v: 0 <= v <= 16, 'in [0, 16] pixels (0: no crops)'),
    'recipe': (lambda v: v == '' or v in RECIPES, "'' or one of " + ', '.join(RECIPES)),
    'accum': (lambda v: 1 <= v <= 4096, 'at least 1 (and batch_size a multiple of ranks x accum)'),
    'gn_weights': (lambda v: _floats(v, 2) and min(map(float, v.split(','))) >= 0,
                   'two numbers >= 0: CE,penalty'),
    'conv': (lambda v: v in ('auto', 'fast', 'native'), 'auto, fast or native'),
}
assert set(RULES) | {'out', 'overwrite', 'amp', 'bn_eval'} == {f.name for f in dataclasses.fields(Config)}


def _floats(text, n):
    try:
        vals = [float(v) for v in text.split(',')]
    except ValueError:
        return False
    return len(vals) == n and all(map(math.isfinite, vals))


def _randaug_spec(text):
    """'' or a spec timm accepts, of numeric sections only: timm skips a section without digits silently."""
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


TRUE, FALSE = ('', '1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')


def _convert(key, val, kind):
    """'--key=val' -> a value of the field's type, or UserError naming what it should be."""
    if kind is bool and val.lower() in TRUE + FALSE:
        return val.lower() in TRUE
    if kind is not bool:
        with contextlib.suppress(ValueError):
            return kind(val)
    expected = {bool: 'true or false', int: 'an int', float: 'a float'}.get(kind, f'a {kind.__name__}')
    raise UserError(f'--{key}={val}: expected {expected}')


def validate(cfg):
    for key, (ok, what) in RULES.items():
        if not ok(getattr(cfg, key)):
            raise UserError(f'--{key}={getattr(cfg, key)}: must be {what}')
    if cfg.min_lr > cfg.lr:
        raise UserError(f'--min_lr={cfg.min_lr} is above --lr={cfg.lr}: lower it')
    if cfg.init == 'pretrained' and not timm_name(cfg.model):
        raise UserError(f'--init=pretrained loads timm\'s weights, but {cfg.model} is a compact model of '
                        'models.py: pass a timm model (e.g. --model=timm/resnet50) or --init=')
    return cfg


def apply_recipe(cfg, given):
    """The recipe's values under the keys not given; lr scales with a --batch_size override (the authors'
    rule); stage 2's init is stage 1's default output folder."""
    recipe = {k: v for k, v in RECIPES[cfg.recipe].items() if k not in given}
    if 'lr' in recipe and 'batch_size' in given:
        recipe['lr'] *= given['batch_size'] / RECIPES[cfg.recipe]['batch_size']
        if 'min_lr' in recipe:  # tiny batches: lr below 1e-5
            recipe['min_lr'] = min(recipe['min_lr'], recipe['lr'])
    cfg = dataclasses.replace(cfg, **recipe)
    if 'init' in recipe and '{' in cfg.init:
        name = os.path.basename(os.path.normpath(cfg.data)) or 'data'
        cfg.init = cfg.init.format(data=name, act=cfg.act)
        if not os.path.isfile(cfg.init):
            raise UserError(f'--recipe={cfg.recipe} starts from the weights {cfg.init}, not there: run '
                            f'{first_stage(cfg.init)} first with this --data, or pass --init=CHECKPOINT')
    return cfg


def first_stage(init):
    """The recipe whose default output folder holds init, e.g. --recipe=cifar_standard (and --act=A where
    init's activation is not the recipe's own)."""
    folder = os.path.basename(os.path.dirname(init))
    out = lambda r, act: f'{r.get("model", "").replace("/", "-")}-{r.get("objective")}-{act}'
    for own in (True, False):  # a recipe of that activation first: rn50_silu_stage1, not rn50_gelu's
        for name, r in RECIPES.items():
            act = r.get('act', Config.act) if own else folder.rpartition('-')[2]
            if out(r, act) == folder:
                return f'--recipe={name}' + ('' if own else f' --act={act}')
    return 'its first stage'


def describe_recipe(cfg):
    """The log's first line: the recipe's knobs as resolved, * where the value is not the recipe's."""
    recipe, parts = RECIPES[cfg.recipe], []
    for k in (f.name for f in dataclasses.fields(Config) if f.name in RECIPES[cfg.recipe]):
        now, was = getattr(cfg, k), recipe[k]
        text = f'{now:.4g}' if isinstance(now, float) else str(now)
        parts.append(f'{k}={text}' + ('*' if now != was and '{' not in str(was) else ''))
    return f'recipe {cfg.recipe}: ' + ' '.join(parts)


def parse_config(argv):
    """--key=value ... -> a checked Config; a recipe fills the keys not given (ImageNet-like data: the
    paper's headline run unless --recipe= says otherwise)."""
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
    if 'recipe' not in given and os.path.isdir(cfg.data) and data_kind(cfg.data) in ('beton', 'folder'):
        cfg.recipe = IMAGENET_DEFAULT  # --recipe= (empty) keeps the plain defaults
    if cfg.recipe in RECIPES:
        cfg = apply_recipe(cfg, given)
    if not cfg.out:
        name = os.path.basename(os.path.normpath(cfg.data)) or 'data'
        cfg.out = os.path.join('runs', name, f'{cfg.model.replace("/", "-")}-{cfg.objective}-{cfg.act}')
    return validate(cfg)


# ---------------------------------------------------------------- processes, stop signals (SLURM, Ctrl-C)

class Stopped(KeyboardInterrupt):
    """A stop signal: SIGTERM, SIGUSR1 (preemption) or SIGINT (Ctrl-C). A KeyboardInterrupt: no `except
    Exception` swallows it, and config.cli prints it in one line (exit status 75, 130 for Ctrl-C)."""

    def __init__(self, signum, where='stopped at once: the newest checkpoint is whole'):
        super().__init__(where)
        self.signum = signum
class Stops(list):
    """`with Stops() as stops:` SIGTERM, SIGUSR1, SIGINT are noted in stops (training looks between steps); in
    stops.at_once() (evaluation) one ends the program where it lands, as a second Ctrl-C does anywhere."""
    hard = False

    def __enter__(self):
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def handle(self, signum, frame):
        self.append(signum)
        if self.hard or self.count(signal.SIGINT) > 1:
            raise Stopped(signum)

    @contextlib.contextmanager
    def at_once(self):
        if self:
            raise Stopped(self[0])
        self.hard = True
        try:
            yield
        finally:
            self.hard = False


def end_distributed():
    """Ends torchrun's process group while Python is fully alive: gloo aborts a process that frees a
    collective's tensor at exit (docs/speed.md, section 5)."""
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
