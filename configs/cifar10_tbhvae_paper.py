"""TBH-VAE with the paper's literal beta-TCVAE weights (alpha, beta, gamma) = (1, 6, 1), no TC hinge.

Kept to reproduce the paper's setting: this penalty is lower for codes with
fewer effective bits than for balanced ones, and its codes collapse as
training goes on (BENCHMARKS.md).
"""
from pathlib import Path

from tbhvae.config import Config, load_config


def get_config() -> Config:
    return load_config(Path(__file__).with_name("cifar10_tbh_reference.py")).replace(
        name="cifar10_tbhvae_paper",
        binary_bottleneck="betatcvae",
        continuous_bottleneck="geco_vae",
        binary_threshold="uniform",
        input_scaling="l2",
        tc_alpha=1.0, tc_beta=6.0, tc_gamma=1.0, tc_hinge=False, tc_marginals="estimator",
    )
