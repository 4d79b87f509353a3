"""Ablation on CIFAR-10: recommended TBH with TBH-VAE's GECO Gaussian continuous bottleneck (one switch)."""
from pathlib import Path

from tbhvae.config import Config, load_config


def get_config() -> Config:
    return load_config(Path(__file__).with_name("cifar10_tbh.py")).replace(
        name="cifar10_tbh_geco", continuous_bottleneck="geco_vae")
