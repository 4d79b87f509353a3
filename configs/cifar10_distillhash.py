"""DistillHash (Yang et al., CVPR 2019) on CIFAR-10 features (`tbhvae.distillhash`): one linear tanh hash
layer on the fixed features, trained with the pairwise likelihood on the pairs of each batch that
survive the distillation; SSDH's initial labels with alpha = 2 and the 5 nearest rows of the batch as
each row's local structure. Batch and budget are the comparison table's.
"""
from tbhvae.config import Config


def get_config() -> Config:
    return Config(
        name="cifar10_distillhash",
        model="distillhash",
        features_extractor="efficientnet_lite0",  # made ../shared/data/cifar10_effnetlite0.npz
        input_scaling="none",
        distillhash_alpha=2.0,
        distillhash_neighbours=5,
        learning_rate=1e-3,  # Adam for one linear layer, as configs/cifar10_greedyhash.py
        bits=32,
        batch_size=400,
        steps=10000,
    )
