"""CIFAR10 DenseNet-BC-100 (k=40) with Neural Rejuvenation: the official README row (method.md 5.2).

Official command: `cifar.py -a densenet --depth 100 --growthRate 40 --epochs 300 --schedule 150 225 --gamma 0.1 --wd 1e-4
--nr-target 0.25 --nr-sparsity 0.0001` (batch 64, lr 0.1, momentum 0.9).
Commands here (variants: nr, baseline, quick):
    python -m experiments.main --config experiments/configs/cifar10_densenet.py --workdir runs/cifar10_densenet
    python -m experiments.main --config experiments/configs/cifar10_densenet.py:baseline \
        --workdir runs/cifar10_densenet_baseline

Should reach (official README): 3.40% test error with 4.12M effective parameters, after
300 + k epochs on a GPU. Needs CIFAR10 (see README, "Data").
"""

from experiments.configs.common import cifar


def get_config(variant: str = "nr"):
    return cifar("cifar10", "densenet_bc100_k40_cifar", 0.0001, variant, allocation="integer")
