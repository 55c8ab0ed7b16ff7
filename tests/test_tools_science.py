"""science.py against independent computations: a hand-written batch norm for the train- vs
eval-mode gradient norms, the evaluator's per-attack numbers for their worst case, hand-made
records for the tables; and one run folder measured end to end."""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint as CK
import config
import tools.science as S
from data import FASHION_MEAN, FASHION_STD
from tests.conftest import demo_model


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(F.gelu(self.bn(self.conv(x))).flatten(1))


def test_bn_gradient_norms_match_independent_computation():
    torch.manual_seed(0)
    model = TinyBN().double()
    model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    model.bn.weight.data.uniform_(0.5, 2), model.bn.bias.data.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.rand(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(2)]
    got = S.bn_gradient_norms(model, batches, smoothing=0.1)

    def norms(forward, per_sample):
        out = []
        for x, y in batches:
            groups = [(x[k : k + 1], y[k : k + 1]) for k in range(len(y))] if per_sample else [(x, y)]
            for xs, ys in groups:  # eval: one image at a time; train: the batch, B * grad of the mean
                xs = xs.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(
                    F.cross_entropy(forward(xs), ys, label_smoothing=0.1) * len(ys), xs
                )
                out.append(g.abs().flatten(1).sum(1))
        return torch.cat(out).mean().item()

    def batch_stats_forward(x):  # batch norm by hand: batch mean and biased variance
        h = model.conv(x)
        mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + model.bn.eps) * model.bn.weight.view(
            1, -1, 1, 1
        ) + model.bn.bias.view(1, -1, 1, 1)
        return model.fc(F.gelu(h).flatten(1))

    assert abs(got['eval'] - norms(model.eval(), True)) < 1e-10
    assert abs(got['train'] - norms(batch_stats_forward, False)) < 1e-10
    assert abs(got['ratio'] - got['eval'] / got['train']) < 1e-12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched



def test_robust_worst_case_and_picture_stats_on_the_demo_model(monkeypatch):
    monkeypatch.setattr(S, 'ATTACKS', ('ce-5', 'margin-5', 'dlr-5'))  # the measure's own are -20: slow here
    model, x = demo_model().eval(), torch.rand(16, 1, 28, 28)
    y = model(x).argmax(1)  # every image correct at first, so the attacks have something to break
    r = S.robust(model, [(x, y)], x, y, 0.05)
    assert r['clean'] == 1 and r['worst'] <= min(r[a] for a in S.ATTACKS) and r['n'] == 16
    st = S.picture_stats(model, [(x, y)])
    assert (
        0 <= st['nyq_grad'] <= 1
        and -1 <= st['edge_corr'] <= 1
        and st['nyq_rel'] == pytest.approx(st['nyq_grad'] / st['nyq_img'])
    )


def test_table_and_curves(tmp_path):
    recs = [
        {'epoch': e, 'clean': 0.5 + 0.1 * s + 0.01 * e, 'worst': 0.4, 'fo_ratio': 1.0 + s}
        for s in range(3)
        for e in range(2)
    ]
    groups = {'base_gelu': {e: [r for r in recs if r['epoch'] == e] for e in range(2)}}
    md = S.table(groups)
    assert '| base_gelu | 0 | 3 | 60.0 ± 10.0 | 40.0 ± 0.0 |' in md and '2.00 ± 1.00' in md
    S.plot_curves(groups, tmp_path / 'c.png')
    from PIL import Image

    assert Image.open(tmp_path / 'c.png').size == (3 * 330 + 20, 3 * 230 + 40)


def test_logs_of_old_and_new_training_code(tmp_path):
    """The per-epoch PGD key was pgd_acc, then pgd_upper: both runs of a group are read."""
    for seed, key in ((0, 'pgd_acc'), (1, 'pgd_upper')):
        os.makedirs(tmp_path / f'g_s{seed}')
        (tmp_path / f'g_s{seed}' / 'metrics.jsonl').write_text(
            json.dumps({'epoch': 0, 'clean_acc': 0.8, key: 0.5 + 0.1 * seed})
        )
    runs = [str(tmp_path / 'g_s0'), str(tmp_path / 'g_s1')]
    assert '| g | 0 | 2 | 80.0 ± 0.0 | 55.0 ± 7.1 | 80.0 / 50.0, 80.0 / 60.0 |' in S.log_table(runs)
    assert S.load_groups(runs)['g'][0][1]['log_pgd'] == 0.6


def test_measure_run_end_to_end(tiny_data, tmp_path, monkeypatch):
    """One checkpoint under main's name (ckpt-<step>-<run id>.pt): one complete record with the log's
    terms; a second pass measures nothing again."""
    monkeypatch.setattr(S, 'ATTACKS', ('ce-2', 'margin-2', 'dlr-2'))
    run = tmp_path / 'r_s0'
    os.makedirs(run)
    cfg = config.Config(data=tiny_data, batch_size=8, epochs=1, eps=0.05, model='resnet_demo')  # demo_model's
    info = dict(in_ch=1, num_classes=10, img_size=28, mean=FASHION_MEAN, std=FASHION_STD)
    CK.save_checkpoint(
        str(run / 'ckpt-00000007-abc.pt'),
        dict(
            model=demo_model().eval().state_dict(),
            ema=None,
            step=7,
            epoch=1,
            config=dataclasses.asdict(cfg),
            data_info=info,
        ),
    )
    (run / 'metrics.jsonl').write_text(
        json.dumps({'epoch': 0, 'clean_acc': 0.1, 'pgd_upper': 0.0, 'gradnorm': 0.3})
    )
    S.measure_run(str(run), n=16)
    recs = [json.loads(line) for line in open(run / 'science.jsonl')]
    assert len(recs) == 1 and recs[0]['step'] == 7 and recs[0]['n'] == 16 and recs[0]['train_penalty'] == 0.3
    assert {'worst', 'fo_ratio', 'fo_margin_ratio', 'bn_ratio', 'nyq_rel'} <= set(recs[0])
    before = (run / 'science.jsonl').read_text()
    S.measure_run(str(run), n=16)
    assert (run / 'science.jsonl').read_text() == before
