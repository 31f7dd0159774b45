"""CIFAR100 DenseNet-BC-100 (k=40) with Neural Rejuvenation: the official README row (method.md 5.2).

Official command: `cifar.py -a densenet --depth 100 --growthRate 40 --epochs 300 --schedule 150 225 --gamma 0.1 --wd 1e-4
--nr-target 0.25 --nr-sparsity 0.0002` (batch 64, lr 0.1, momentum 0.9).
Commands here (variants: nr, baseline, quick):
    python -m experiments.main --config experiments/configs/cifar100_densenet.py --workdir runs/cifar100_densenet
    python -m experiments.main --config experiments/configs/cifar100_densenet.py:baseline \
        --workdir runs/cifar100_densenet_baseline

Should reach (official README): 18.59% test error with 4.31M effective parameters, after
300 + k epochs on a GPU. Needs CIFAR100 (see README, "Data").
"""

from experiments.configs.common import cifar


def get_config(variant: str = "nr"):
    return cifar("cifar100", "densenet_bc100_k40_cifar", 0.0002, variant, allocation="integer")
