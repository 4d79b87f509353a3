"""Ablation on CIFAR-10: TBH-VAE's beta-TCVAE binary bottleneck + TBH's adversarial continuous bottleneck."""
from pathlib import Path

from tbhvae.config import Config, load_config


def get_config() -> Config:
    return load_config(Path(__file__).with_name("cifar10_tbhvae.py")).replace(
        name="cifar10_tbh_betatcvae", continuous_bottleneck="adversarial")
