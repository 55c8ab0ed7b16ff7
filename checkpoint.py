"""Checkpoints and the run folder: a checkpoint is written whole or not at all, and refused in one line when
it is not one of ours; one run at a time per --out; a resume continues only the run a checkpoint came from,
on the data it was trained on, where it stopped."""
import contextlib
import dataclasses
import fcntl
import glob
import gzip
import hashlib
import json
import os
import shutil
import socket
import sys

import numpy as np
import torch

from config import Config, UserError, changed, data_kind, warn
from data import CIFAR_CLASSES, FASHION_CLASSES, beton_labels, cifar10, fashion_files, list_images, read_idx

# ---------------------------------------------------------------- writing

def write_failure(e, path):
    """Why a write failed, in a few words: torch.save raises RuntimeError, not OSError, on a full disk."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return f'{str(e).splitlines()[0][:120]}; {free / 2 ** 20:.1f} MiB free on its disk'


def save_checkpoint(path, state):
    """Atomic (temp file, fsync, rename): a crash or a full disk leaves no truncated checkpoint."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise UserError(f'cannot write checkpoint {path!r} ({write_failure(e, path)}); earlier checkpoints '
                        'are intact: free some disk space or pass --out=DIR, then --resume=auto') from None
    finally:  # any exception, a second Ctrl-C's too, leaves no partial file
        with contextlib.suppress(OSError):
            os.remove(tmp)


def append_line(path, line):
    """Appends line + newline, or nothing: a failed write (a full disk) is cut off again."""
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


# ---------------------------------------------------------------- reading

# what each reader of a checkpoint needs: (key, type); config must name these fields
EVAL_KEYS = (('config', dict), ('model', dict), ('data_info', dict))
RESUME_KEYS = EVAL_KEYS + (('optimizer', dict), ('step', int), ('run', str))
CONFIG_KEYS = ('model', 'act', 'objective', 'eps', 'data')
RETIRED = {'res_start': 0}  # options of earlier versions: their runs load if they left them at this value


def what_file(path, e):
    """What a file torch.load(weights_only=True) refused is, in words."""
    if os.path.isdir(path):
        return 'it is a directory'
    with open(path, 'rb') as f:
        head = f.read(4096)
    if not head:
        return 'it is empty (0 bytes)'
    if b'\0' not in head and not head.startswith((b'PK', b'\x80')):
        return 'it is a text file'
    if 'weights_only' in str(e):
        return 'it holds pickled Python code or objects, refused by torch.load(weights_only=True)'
    if head.startswith(b'PK\x03\x04'):
        return 'it is a truncated or corrupt zip (torch.save writes zip files)'
    return 'it is corrupt, or not a file of torch.save'


def load_checkpoint(path, keys=EVAL_KEYS, weights=False):
    """A checkpoint of ours holding keys of their types: refused in one line naming what the file is, never a
    KeyError later. weights: a bare state_dict is accepted too, as {'model': it, 'config': None}."""
    if not os.path.exists(path):
        raise UserError(f'no checkpoint at {path!r}')
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; a truncated file fails to unzip
        raise UserError(f'cannot load checkpoint {path!r}: {what_file(path, e)}') from None
    if not isinstance(ck, dict):
        raise UserError(f'{path} is a torch.save of a {type(ck).__name__}, not a checkpoint of train.py')
    if ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
        if weights:
            return {'model': ck, 'config': None}
        raise UserError(f'{path} is a bare state_dict ({len(ck)} tensors), weights without a run\'s config: '
                        f'train from them with train.py --init={path} (--init takes weights alone)')
    if isinstance(ck.get('state_dict'), dict) and 'config' not in ck:
        raise UserError(f'{path} is another program\'s training checkpoint (timm\'s layout: weights under '
                        "'state_dict'): save them alone, torch.save(ck['state_dict'], 'weights.pt'), and "
                        'pass --init=weights.pt')
    bad = [f'its {k!r} is missing or not a {kind.__name__}'
           for k, kind in keys if not isinstance(ck.get(k), kind)]
    if not bad and 'config' in dict(keys):
        for k, value in RETIRED.items():
            if ck['config'].get(k, value) == value:
                ck['config'].pop(k, None)
        fields = {f.name for f in dataclasses.fields(Config)}
        bad = [f'its config lacks {k!r}' for k in CONFIG_KEYS if k not in ck['config']]
        bad += [f'its config has an unknown key {k!r}' for k in sorted(set(ck['config']) - fields)]
    if bad:
        raise UserError(f'{path} is not a checkpoint of this version of train.py: {bad[0]}')
    return ck


def checkpoints(out, run=None):
    """The checkpoint files in out, oldest first: ckpt-<step>-<run id>.pt, of one run if given."""
    return sorted(glob.glob(os.path.join(out, f'ckpt-*-{run or "*"}.pt')))


# ---------------------------------------------------------------- the run folder: one run at a time

def claim_out(cfg):
    """One live run per folder: OUT/run.lock, flocked while this process lives (kill -9 leaves no stale lock).
    A folder that holds another run needs --resume or --overwrite (clear_old_run). -> (lock file, made OUT)"""
    made = not os.path.isdir(cfg.out)
    try:
        os.makedirs(cfg.out, exist_ok=True)
        while True:  # the file may be removed (release) between open and flock: lock the one on disk
            f = open(os.path.join(cfg.out, 'run.lock'), 'a+')
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or 'starting'
                raise UserError(f'{cfg.out} is in use by another run ({owner}): wait for it to end, or pass '
                                'another --out') from None
            if os.path.exists(f.name) and os.path.samestat(os.fstat(f.fileno()), os.stat(f.name)):
                break
            f.close()
        f.truncate(0)
        f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        f.flush()
    except OSError as e:
        raise UserError(f'cannot use output directory {cfg.out!r} ({e.strerror}): pass --out=DIR') from None
    if not cfg.resume and old_run(cfg) and not cfg.overwrite:
        release((f, made), cfg)
        newest = os.path.basename(old_run(cfg)[-1])
        raise UserError(f'{cfg.out} holds another run ({newest}): continue it with --resume=auto, start '
                        'afresh there with --overwrite (deletes it), or pass another --out')
    return f, made


def old_run(cfg):
    files = [os.path.join(cfg.out, f) for f in ('ckpt.pt', 'metrics.jsonl')]
    return checkpoints(cfg.out) + [f for f in files if os.path.exists(f)]


def clear_old_run(cfg):
    """--overwrite: the old run goes only now, when the new one holds the lock and has passed every check."""
    for path in old_run(cfg) if cfg.overwrite and not cfg.resume else ():
        os.remove(path)


def release(claim, cfg):
    """Unlocks OUT; a folder this run made and left empty (it failed at start) is removed."""
    f, made = claim
    if made and os.listdir(cfg.out) == ['run.lock']:
        os.remove(f.name)
        with contextlib.suppress(OSError):
            os.rmdir(cfg.out)
    f.close()


# ---------------------------------------------------------------- the data a checkpoint was trained on

def identity(data):
    """What the data are, read without decoding an image: path, class names in label order (None: betons
    without classes.txt), training images per class and their sum, a fingerprint (the IDX headers and
    labels, CIFAR-10's MD5s, or the list of files), the kind (config.data_kind; evaluate.resolve reads it)."""
    kind, h, classes = data_kind(data), hashlib.sha256(), None
    if kind == 'fashion':
        for i, f in enumerate(fashion_files(data)):  # images, labels, images, labels
            with gzip.open(f) as g:
                h.update(g.read(16) + str(os.path.getsize(f)).encode() + (g.read() if i % 2 else b''))
        labels, classes = read_idx(fashion_files(data)[1]).numpy(), FASHION_CLASSES
    elif kind == 'folder':
        classes, train = list_images(os.path.join(data, 'train'))
        names = [f'{os.path.relpath(p, data)} {y}' for p, y in train + list_images(f'{data}/val', classes)[1]]
        h.update('\n'.join(names).encode('utf-8', 'surrogateescape'))
        labels = np.array([y for _, y in train], np.int64)
    elif kind == 'cifar':  # the batch files' MD5s
        h.update(' '.join(cifar10(data)['md5']).encode())
        labels, classes = cifar10(data)['train'][1].numpy(), CIFAR_CLASSES
    else:
        labels = np.asarray(beton_labels(f'{data}/train.beton'), np.int64)
        for name in ('train_files.txt', 'val_files.txt', 'classes.txt'):  # tools/beton.py writes them
            with contextlib.suppress(FileNotFoundError), open(os.path.join(data, name), 'rb') as f:
                h.update(text := f.read())
                classes = text.decode(errors='surrogateescape').splitlines() if 'classes' in name else None
    counts = np.bincount(labels, minlength=len(classes or ())).tolist()
    return dict(path=os.path.abspath(data), classes=classes and list(classes), counts=counts,
                size=sum(counts), fingerprint=h.hexdigest()[:16], kind=kind)


def check_data(path, ck, info, data, subset=False):
    """UserError unless the data fit the checkpoint's model (classes, channels); subset: fewer classes do."""
    want = {k: ck['data_info'].get(k) for k in ('num_classes', 'in_ch')}
    have = {k: info[k] for k in want}
    n_here, n_trained = have['num_classes'], want['num_classes']
    if want['in_ch'] != have['in_ch'] or not (n_here <= n_trained if subset else n_here == n_trained):
        trained, here = (f'{d["num_classes"]} classes of {d["in_ch"]}-channel images' for d in (want, have))
        raise UserError(f'{path} was trained on {trained}, {data} has {here}: pass the data it was '
                        'trained on (--data=DIR)')


def check_identity(path, ck, data_id, remap=False):
    """The data against the checkpoint's record of its training data (identity): other class names or
    another order refused (remap: evaluation maps the labels by name instead, said in one line); other
    images, a warning naming both fingerprints (a resume: of as many images; more or fewer is a change of
    settings). -> each class's index in the checkpoint, or None"""
    was = ck.get('data_id')
    if not was:
        return print(f'{path} records no class names or data fingerprint (an earlier version): the data are '
                     'not checked against them', file=sys.stderr)
    old, new, where, order = was['classes'], data_id['classes'], data_id['path'], None
    if old and new and old != new:
        i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)  # as many: check_data came first
        if not remap or sorted(old) != sorted(new):
            raise UserError(f'{path} was trained on other classes than {where} has, or in another order: '
                            f'class {i} is {old[i]!r} there, {new[i]!r} here: pass the data it was '
                            'trained on')
        order = [old.index(c) for c in new]
        print(f'{where}: the classes of {path} in another order (class {i} is {new[i]!r} here, {old[i]!r} '
              'there): labels mapped by name', file=sys.stderr)
    if was['fingerprint'] != data_id['fingerprint'] and (remap or was['size'] == data_id['size']):
        warn(f'{where} (fingerprint {data_id["fingerprint"]}, {data_id["size"]} training images) holds other '
             f'images than {path} was trained on: {was["path"]} (fingerprint {was["fingerprint"]})')
    return order


# ---------------------------------------------------------------- resuming

def find_resume(cfg, log):
    """--resume=PATH, or --resume=auto: the newest checkpoint in --out that loads."""
    if cfg.resume != 'auto':
        return cfg.resume, load_checkpoint(cfg.resume, RESUME_KEYS)
    for path in reversed(checkpoints(cfg.out)):
        try:
            return path, load_checkpoint(path, RESUME_KEYS)
        except UserError as e:
            log(f'warning: skipping {e}')
    log(f'--resume=auto: no checkpoint in {cfg.out} that loads: a new run starts there')
    return None, None


def check_resume(cfg, ck, path, info, data_id):
    """A checkpoint continues only the run it came from: the same model, data (class names, shape) and
    settings, but those --resume_changes accepts. -> [dict(key, old, new)], the settings changed now"""
    old, accept = ck['config'], set(cfg.resume_changes.split(','))
    if old['model'] != cfg.model or (old['act'] != cfg.act and 'act' not in accept):
        raise UserError(f'{path} holds a {old["model"]}/{old["act"]} model, not the requested '
                        f'{cfg.model}/{cfg.act}: pass --model={old["model"]} --act={old["act"]} or another '
                        '--out')
    if old['objective'] != cfg.objective and 'objective' not in accept:
        raise UserError(f'{path} is a {old["objective"]} run, not {cfg.objective}: resume it with '
                        f'--objective={old["objective"]}, or start a new run from its weights with '
                        f'--init={path}')
    if differ := [k for k in ('in_ch', 'num_classes', 'img_size') if ck['data_info'].get(k) != info[k]]:
        raise UserError(f'{path} was trained on data with {differ[0]}={ck["data_info"].get(differ[0])}, '
                        f'--data={cfg.data} has {info[differ[0]]}: pass the data it was trained on, or '
                        'another --out')
    check_identity(path, ck, data_id)
    was, now, diffs = (ck.get('data_id') or data_id)['size'], data_id['size'], changed(old, cfg)
    diffs += [('data', f'{was} training images', f'{now} training images')] * (was != now)
    # more or fewer epochs change no step done; an earlier version's position is in steps of its batch size
    fixed = {'batch_size'} if 'images' not in ck else set()
    refused = [d for d in diffs if d[0] not in accept - fixed | {'epochs'}]
    if refused:
        raise UserError(f'{path} was trained with other settings: '
                        + ', '.join(f'{k} {o} -> {n}' for k, o, n in refused) + ': pass its values, or '
                        f'accept the change with --resume_changes={",".join(k for k, _, _ in refused)}')
    return [dict(key=k, old=o, new=n) for k, o, n in diffs]


def restore(run, ck, path, changes, log):
    """Continues where the checkpoint stopped: its epoch, the images of it done (whatever the batch size
    then), the epoch's running sums; the settings changed now join the run's history (run.changes)."""
    b, run.step, run.epoch = run.cfg.batch_size // run.world, ck['step'], ck.get('epoch', 0)
    run.pos = ck.get('images', (run.step - run.epoch * run.steps) * run.cfg.batch_size) // run.world
    run.done, run.sums = ck.get('done', 0), ck.get('sums', {})
    run.sums = {k: v.to(run.device) for k, v in run.sums.items()}
    if 'images' not in ck:
        log(f'{path} records no position in images nor running sums (an earlier version): epoch '
            f'{run.epoch}\'s means count from here')
    done = run.pos >= run.steps * b  # the epoch's last step: changes count from the next one
    at = dict(step=run.step, epoch=run.epoch + done, images=0 if done else run.pos * run.world)
    run.changes = ck.get('changes', []) + [dict(c, **at) for c in changes]
    for c in changes:
        log(f'resume: {c["key"]} {c["old"]} -> {c["new"]} from step {run.step} (epoch {at["epoch"]})')
    if done and evaluated(run):  # its evaluation ended too (the checkpoint is written before it): the next
        run.epoch, run.pos, run.sums, run.done = run.epoch + 1, 0, {}, 0
    part = f' (+{run.pos % b} images)' if run.pos % b else ''
    log(f'resumed from {path} at epoch {run.epoch} step {run.pos // b}{part}')


def evaluated(run):
    """Whether OUT/metrics.jsonl has this run's line for run.epoch: a resume from the checkpoint written
    before that epoch's evaluation, after the evaluation ended."""
    path = os.path.join(run.cfg.out, 'metrics.jsonl')
    lines = map(json.loads, open(path).read().splitlines()) if os.path.exists(path) else ()
    return any(m.get('run') == run.run_id and m.get('epoch') == run.epoch for m in lines)
