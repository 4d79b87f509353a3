"""TBH on MS-COCO 2017 (multi-label: relevant = at least one shared object class)."""
from pathlib import Path

from tbhvae.config import Config, load_config


def get_config() -> Config:
    return load_config(Path(__file__).with_name("cifar10_tbh.py")).replace(
        name="coco_tbh", images="tfds:coco/2017")
