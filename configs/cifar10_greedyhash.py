"""GreedyHash, unsupervised (Su et al., NeurIPS 2018) on CIFAR-10 features, as the authors' code
trains it: one linear hash layer on the fixed features, the raw features' cosines as the target,
the cubic penalty at 0.1 (`tbhvae.greedyhash`). Batch and budget are the comparison table's.
"""
from tbhvae.config import Config


def get_config() -> Config:
    return Config(
        name="cifar10_greedyhash",
        model="greedyhash",
        features_extractor="efficientnet_lite0",  # made ../shared/data/cifar10_effnetlite0.npz
        input_scaling="none",
        greedyhash_penalty_weight=0.1,
        # Adam for one linear layer: 1e-3 (32 bits, 10k steps: q10k 0.474; 1e-2: 0.469; the shared 1e-4
        # reached 0.383 after 2k steps), BENCHMARKS.md
        learning_rate=1e-3,
        bits=32,
        batch_size=400,
        steps=10000,
    )
