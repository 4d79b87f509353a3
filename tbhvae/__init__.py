"""tbhvae: unsupervised deep image hashing (TBH and TBH-VAE) in TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
