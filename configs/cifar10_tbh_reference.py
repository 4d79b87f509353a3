"""TBH (Shen et al. 2020) on CIFAR-10 as the reference code trains it (faithful; no additions)."""
from tbhvae.config import Config


def get_config() -> Config:
    return Config(
        name="cifar10_tbh_reference",
        binary_bottleneck="adversarial",
        continuous_bottleneck="adversarial",
        features_extractor="efficientnet_lite0",  # made ../shared/data/cifar10_effnetlite0.npz
        bits=32,
        batch_size=400,
        steps=5000,
    )
