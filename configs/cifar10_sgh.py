"""SGH, Stochastic Generative Hashing (Dai et al., ICML 2017) on CIFAR-10 features: a linear Bernoulli
encoder and a linear Gaussian decoder on the fixed features, trained on the negative ELBO with rho and
theta learned (`tbhvae.sgh`). The features are unscaled, as the authors' code feeds them. Batch and
budget are the comparison table's.
"""
from tbhvae.config import Config


def get_config() -> Config:
    return Config(
        name="cifar10_sgh",
        model="sgh",
        features_extractor="efficientnet_lite0",  # made ../shared/data/cifar10_effnetlite0.npz
        input_scaling="none",
        learning_rate=1e-3,  # Adam for one linear layer each way, as cifar10_greedyhash
        bits=32,
        batch_size=400,
        steps=10000,
    )
