"""Ablation on CIFAR-10: TBH's adversarial binary bottleneck + TBH-VAE's GECO Gaussian continuous bottleneck."""
from pathlib import Path

from tbhvae.config import Config, load_config


def get_config() -> Config:
    return load_config(Path(__file__).with_name("cifar10_tbhvae.py")).replace(
        name="cifar10_tbh_geco", binary_bottleneck="adversarial")
