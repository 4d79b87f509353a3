"""The shipped configs, installed as the package `tbhvae.configs` (setup.cfg maps it to this folder).

`tbhvae.config.load_config("cifar10_tbhvae")` (and `train.py --config cifar10_tbhvae`)
finds them by name from anywhere; a path to a config file works as well.
"""
