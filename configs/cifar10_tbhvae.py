"""TBH-VAE (Verwilt et al.) on CIFAR-10, recommended: beta-TCVAE binary bottleneck, GECO Gaussian continuous one.

The binary penalty is the aggregate KL(q(b) || p(b)) with the TC floor of
ideal codes hinged away (alpha = 0, beta = gamma = 1; the Config defaults),
whose minimum is balanced, independent bits; `cifar10_tbhvae_paper.py` keeps
the paper's weights. The shared improvements are those of `cifar10_tbh.py`.
"""
from pathlib import Path

from tbhvae.config import Config, load_config


def get_config() -> Config:
    return load_config(Path(__file__).with_name("cifar10_tbh.py")).replace(
        name="cifar10_tbhvae",
        binary_bottleneck="betatcvae",
        continuous_bottleneck="geco_vae",
        binary_threshold="uniform",  # b ~ Bernoulli(sigmoid(l)): a true posterior sample
    )
