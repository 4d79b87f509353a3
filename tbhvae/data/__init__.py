"""Data: feature sets (`features`), image sources (`images`) and backbone feature extraction (`extraction`)."""
from tbhvae.data.features import DataError, FeatureSet, load_features, save_features, validate

__all__ = ["DataError", "FeatureSet", "load_features", "save_features", "validate"]
