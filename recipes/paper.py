"""The paper's runs, as small dicts of Config fields (config.py reads RECIPES; the shape of nanoGPT's
presets). `python train.py --recipe=NAME [--key=value ...]`: the keys given override the recipe's."""
import math

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

# CIFAR-10: configs_cifar/{nattrain,gradnorm,advtrain}_prn18_gelu.yaml, run by adversarial_training_cifar.py
# (docs/paper.md, "CIFAR-10"). 128 per GPU on 2 GPUs (run_train_cifar.sh; their snapshot-50-194 is the
# last of 50,000 // 256 = 195 steps of an epoch). Their crop is timm's random-resized one, which CIFAR data
# here does not have: pad-4 crops instead. They train in eval mode: BatchNorm keeps its initial 0/1 stats.
CIFAR = dict(model='prn18', act='gelu', batch_size=256, lr=1.25e-3 * 256 / 512, weight_decay=0.05,
             warmup_epochs=5.0, min_lr=1e-5, smoothing=0.1, mixup=0.8, cutmix=1.0,
             randaug='rand-m9-mstd0.5-inc1', reprob=0.25, pad=4, amp=False, bn_eval=True, eps=8 / 255)
# stage 2 starts from the standard run's weights, as theirs from nattrain's epoch-50 snapshot (51 epochs)
CIFAR2 = dict(CIFAR, init='runs/{data}/prn18-standard-{act}/ckpt.pt', epochs=300, ema=0.9998)
RECIPES.update({
    # their nattrain schedule is 100 epochs, cut at 51: ours completes its cosine in 51
    'cifar_standard': dict(CIFAR, objective='standard', epochs=51, clip=math.inf, ema=0.0),
    # their penalty is 1.2 x (4/255) ||g||_1 (input_norm_losses.DBP's default eps) = 0.6 x (8/255) ||g||_1:
    # the same loss, written at the 8/255 their attack and evaluation use
    'cifar_gradnorm': dict(CIFAR2, objective='gradnorm', clip=1.0, ramp_epochs=5.0, gn_weights='0.8,0.6'),
    'cifar_pgd': dict(CIFAR2, objective='pgd', pgd_steps=3, clip=math.inf),
    # FGSM-RS is not in their code: cifar_pgd's run with Wong et al.'s objective
    'cifar_fgsm': dict(CIFAR2, objective='fgsm', clip=math.inf),
})
