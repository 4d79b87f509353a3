"""Unsupervised hashing with pseudo labels (Zhang et al., IEEE TIP 2018) on CIFAR-10 features
(`tbhvae.pseudolabel`): k-means pseudo labels of the fixed features, a sigmoid hash layer and a
softmax classifier over the pseudo labels, with the bit-balance and quantisation terms at weight 1.
Batch and budget are the comparison table's (as GreedyHash's config).
"""
from tbhvae.config import Config


def get_config() -> Config:
    return Config(
        name="cifar10_pseudolabel",
        model="pseudolabel",
        features_extractor="efficientnet_lite0",  # made ../shared/data/cifar10_effnetlite0.npz
        input_scaling="none",
        # K is not the paper's (unread here). 32 bits, 10k steps, Adam 1e-4, q10k mAP@1000: K = 100 0.544,
        # K = 300 0.545 (train seconds 47 against 24); /work/runs/pseudolabel_32_s0_lr1e-4[_k300]
        pseudolabel_clusters=100,
        pseudolabel_balance_weight=1.0,
        pseudolabel_quantisation_weight=1.0,
        # Adam 1e-4: q10k mAP@1000 0.544 at 10k steps; 1e-3: 0.529, falling from 0.545 (1k queries) at 1k steps
        # as the classifier fits the pseudo labels (cross-entropy 0.18 against 1.26 at 1e-4)
        learning_rate=1e-4,
        bits=32,
        batch_size=400,
        steps=10000,
    )
