"""TBH on CIFAR-10, recommended: the reference model plus this library's shared improvements.

The improvements (the same in `cifar10_tbhvae.py`, so that the 2 x 2 ablation
compares bottlenecks only): unit-norm input rows, and a pairwise similarity
term that pulls the codes' inner products toward the features' neighbourhood
structure (centred cosine and AGH's anchor graph).
"""
from tbhvae.config import Config


def get_config() -> Config:
    return Config(
        name="cifar10_tbh",
        binary_bottleneck="adversarial",
        continuous_bottleneck="adversarial",
        features_extractor="efficientnet_lite0",  # made ../shared/data/cifar10_effnetlite0.npz
        input_scaling="l2",
        similarity_weight=16.0,
        similarity_target="anchor",
        bits=32,
        batch_size=400,
        steps=10000,
    )
