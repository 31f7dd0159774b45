"""CIFAR100 VGG-19 with Neural Rejuvenation: the official README row (method.md 5.2).

Official command: `cifar.py -a vgg19_bn --epochs 300 --schedule 150 225 --gamma 0.1 --wd 1e-4
--nr-target 0.25 --nr-sparsity 0.0003` (batch 64, lr 0.1, momentum 0.9).
Commands here (variants: nr, baseline, quick):
    python -m experiments.main --config experiments/configs/cifar100_vgg19.py --workdir runs/cifar100_vgg19
    python -m experiments.main --config experiments/configs/cifar100_vgg19.py:baseline \
        --workdir runs/cifar100_vgg19_baseline

Should reach (official README): 21.53% test error with 10.04M effective parameters, after
300 + k epochs on a GPU. Needs CIFAR100 (see README, "Data").
"""

from experiments.configs.common import cifar


def get_config(variant: str = "nr"):
    return cifar("cifar100", "vgg19_cifar", 0.0003, variant)
