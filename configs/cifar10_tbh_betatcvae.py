"""Ablation on CIFAR-10: recommended TBH with TBH-VAE's beta-TCVAE binary bottleneck (one switch).

The switch is the binary bottleneck with its posterior sampling (b ~ Bernoulli,
threshold eps ~ U(0, 1)), which the VAE's KL assumes; everything else is
`cifar10_tbh.py`.
"""
from pathlib import Path

from tbhvae.config import Config, load_config


def get_config() -> Config:
    return load_config(Path(__file__).with_name("cifar10_tbh.py")).replace(
        name="cifar10_tbh_betatcvae", binary_bottleneck="betatcvae", binary_threshold="uniform")
