"""Evaluate a checkpoint the authors released (timm's CheckpointSaver .pth.tar) with evaluate.py's
attacks and checks: their EMA weights, as the paper reports them, on ImageNet data given by --data.

    python -m tools.official --ckpt gradnorm_swinb.pth.tar --model swin_base_patch4_window7_224 --data DIR
    make eval CKPT=official:gradnorm_swinb.pth.tar MODEL=swin_base_patch4_window7_224 DATA=DIR
Every other option is evaluate.py's (--eps, --attacks, --autoattack, --n, ...).
"""
import argparse
import dataclasses
import sys

import torch

import evaluate
from config import Config, UserError, __version__, checked, cli, data_kind
from models import ACTS, IMAGENET_MEAN, IMAGENET_STD, build_model, is_model, timm_name


def load_timm_state_dict(model, state_dict):
    """A bare timm model's weights into our TimmModel, through timm's converter where the architecture
    has one (the authors' Swin checkpoints use the original layout)."""
    convert = getattr(sys.modules[type(model.model).__module__], 'checkpoint_filter_fn', None)
    if convert is not None:
        state_dict = convert(state_dict, model.model)
    model.model.load_state_dict(state_dict, strict=True)
    return model


def load_official(path, model, act='gelu'):
    """The bare timm model's weights are under 'state_dict' and 'state_dict_ema' (the one they
    evaluate), their ImageNet mean/std in 'args'. -> (a checkpoint dict of ours describing it, the
    model with the EMA weights)."""
    if not timm_name(model):
        raise UserError(f'--model={model}: the authors\' checkpoints hold timm models: pass '
                        '--model=swin_base_patch4_window7_224 or --model=timm/resnet50')
    try:  # their args are an argparse.Namespace of plain values: allowed, nothing else is unpickled
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        why = str(e).splitlines()[0][:200]
        raise UserError(f'cannot load {path!r} as an official checkpoint ({why})') from None
    if not isinstance(raw, dict) or 'state_dict_ema' not in raw:
        raise UserError(f'{path} holds no state_dict_ema: not a checkpoint of the authors\' training script')
    args = raw.get('args')
    info = dict(in_ch=3, num_classes=1000, img_size=224, mean=tuple(getattr(args, 'mean', IMAGENET_MEAN)),
                std=tuple(getattr(args, 'std', IMAGENET_STD)))
    net = build_model(model, act, **info)
    try:
        load_timm_state_dict(net, raw['state_dict_ema'])
    except RuntimeError as e:
        raise UserError(f'{path} does not fit --model={model}: {" ".join(str(e).split())[:300]}') from None
    cfg = dataclasses.asdict(Config(objective='official', model=model, act=act, eps=4 / 255, res=224))
    # 'ema' names the weights it holds, so the evaluator reports them as EMA weights
    return dict(config=cfg, data_info=info, ema='state_dict_ema', epoch=raw.get('epoch'), run='official',
                version=__version__), net


def main(argv):
    p = evaluate.parser(__doc__)
    p.add_argument('--model', type=checked(str, is_model, 'a timm model'), required=True,
                   help='its timm model: swin_base_patch4_window7_224 or timm/resnet50')
    p.add_argument('--act', choices=list(ACTS), default='gelu', help='its activation (GELU: as released)')
    args = evaluate.check_args(p.parse_args(argv))
    if args.weights == 'model':  # checked before loading a large file
        raise UserError('an official checkpoint is evaluated with its EMA weights, as the paper: '
                        'leave out --weights')
    if not args.data:
        raise UserError('official checkpoints do not name their data: pass --data=IMAGENET (an ImageFolder '
                        'or .beton folder)')

    def checkpoint(args):
        ck, model = load_official(args.ckpt, args.model, args.act)
        # ImageNet as it is stored; the 1000-class model may see a folder of some of its classes
        loader = 'ffcv' if data_kind(args.data) == 'beton' else 'torchvision'
        ck['config'].update(data=args.data, loader=loader)
        evaluate.resolve(args, ck)
        return ck, model
    return evaluate.run(args, checkpoint)


if __name__ == '__main__':
    sys.exit(cli(main, sys.argv[1:]))
