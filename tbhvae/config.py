"""Experiment configuration: one frozen dataclass, config files as data, overrides.

A config file is a Python file defining `get_config() -> Config` (see
`configs/`). Command-line overrides are `key=value` strings parsed with the
field's type; unknown keys and ill-typed values raise ConfigError naming the
key. The resolved config is written to each run directory as JSON.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import importlib.util
import inspect
import json
import os
import re
import typing
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A bad config, config file or override; the message names the key and the fix."""


# The deep hashing families (tbhvae.hashing_model.FAMILIES)
ModelFamily = Literal["twin_bottleneck", "greedyhash", "sgh", "pseudolabel", "distillhash"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Units in the comments."""

    name: str = "tbh"  # run name (default run directory runs/<name>_<bits>b)
    # --- data ---------------------------------------------------------------
    features: str = ""  # feature .npz; empty: extract from `images` with `backbone`
    images: str = "tfds:cifar10"  # image source for extraction ("tfds:NAME" or JPEG .npz)
    backbone: str = "vgg16_fc7"  # feature extractor for `images` (see tbhvae.data.extraction)
    backbone_weights: str = "imagenet"  # "imagenet" | "none" | path to a weights file
    # backbone (ImageNet weights) that made `features` when the file does not record it; recorded in
    # the run, so that export adds image signatures with it ("" = unknown: features only)
    features_extractor: str = ""
    data_dir: str = ""  # TFDS data_dir ("" = TFDS default)
    cache_dir: str = "~/.cache/tbhvae"  # extracted feature cache
    input_scaling: Literal["none", "standardize", "l2"] = "none"  # none: as the reference code; l2: unit-norm rows
    # --- model --------------------------------------------------------------
    model: ModelFamily = "twin_bottleneck"  # family: TBH / TBH-VAE | GreedyHash | SGH | PseudoLabel | DistillHash
    bits: int = 32  # M, binary code length
    continuous_dim: int = 512  # size of the continuous bottleneck z
    hidden_dim: int = 1024  # encoder/decoder hidden width
    binary_bottleneck: Literal["adversarial", "betatcvae"] = "adversarial"  # adversarial: TBH; betatcvae: TBH-VAE
    continuous_bottleneck: Literal["adversarial", "geco_vae"] = "adversarial"  # adversarial: TBH; geco_vae: TBH-VAE
    binary_threshold: Literal["fixed", "uniform"] = "fixed"  # eps = 0.5 (reference code) | eps ~ U(0, 1)
    continuous_activation: Literal["sigmoid", "linear"] = "sigmoid"  # TBH's z activation
    graph_exponent: float = 1.4  # gamma in A = (1 - d_H/M)^gamma (1.4 code, 1.0 paper)
    decoder_activation: Literal["relu", "linear"] = "relu"  # relu: as the reference code
    discriminator: Literal["linear", "mlp"] = "linear"  # one Dense (reference code) | an MLP
    discriminator_hidden: int = 256  # hidden width of the "mlp" critic
    # --- objectives ---------------------------------------------------------
    reconstruction: Literal["sum", "mean"] = "sum"  # l2_loss of the batch (reference code) | per element
    reconstruction_weight: float = 1.0  # multiplies the reconstruction loss (models without GECO)
    adversarial_weight: float = 1.0  # weight of both adversarial terms in the encoder's loss
    # beta-TCVAE penalty alpha*MI + beta*max(0, TC - floor) + gamma*DWKL. alpha = 0 and beta = gamma
    # (the aggregate KL(q(b) || p(b)), InfoVAE-like) with the floor hinged is the setting whose
    # minimum is balanced, independent bits; the paper's (1, 6, 1) without the hinge rewards fewer bits.
    tc_alpha: float = 0.0  # index-code mutual information weight
    tc_beta: float = 1.0  # total correlation weight
    tc_gamma: float = 1.0  # dimension-wise KL weight
    tc_hinge: bool = True  # subtract the TC of ideal codes, max(0, M log 2 - log N), and clip at 0
    tc_estimator: Literal["mws", "mss"] = "mss"  # minibatch-weighted | minibatch-stratified
    tc_marginals: Literal["batch_mean", "estimator"] = "batch_mean"  # q(b_k): Bernoulli(mean p) | as q(b)
    binary_kl_weight: float = 1.0  # overall weight of the beta-TCVAE terms
    similarity_weight: float = 0.0  # pairwise code-similarity term as a likelihood, x (B - 1) M / 2 (0 = off)
    similarity_target: Literal["cosine", "anchor"] = "cosine"  # centred cosine | max(anchor graph, cosine)
    similarity_scale: float = 2.0  # target = clip(scale * centred cosine, -1, 1)
    anchors: int = 300  # anchor-graph target: k-means anchors (AGH's default)
    nearest_anchors: int = 2  # anchor-graph target: anchors per row (AGH's default)
    greedyhash_penalty_weight: float = 0.1  # GreedyHash: weight of mean |(|h| - 1)|^3 (0.1: the authors' code)
    pseudolabel_clusters: int = 100  # PseudoLabel: K, k-means clusters = pseudo classes (not the paper's: unread)
    pseudolabel_balance_weight: float = 1.0  # PseudoLabel: weight of log 2 - mean bit entropy (nats per bit)
    pseudolabel_quantisation_weight: float = 1.0  # PseudoLabel: weight of mean (h - 1[h > 1/2])^2
    distillhash_alpha: float = 2.0  # DistillHash: pair similar at first if cosine distance <= mode - alpha sigma_left
    distillhash_neighbours: int = 5  # DistillHash: k, a row's local structure = its k nearest rows of the batch
    decorrelation_weight: float = 0.0  # weight of the bits' batch decorrelation term on 2b - 1 (0 = off)
    geco_kappa: float = 0.0  # reconstruction tolerance (feature units, RMSE); 0 = calibrate
    geco_calibration_steps: int = 200  # steps of the warm-up that calibrates kappa
    geco_kappa_factor: float = 0.9  # calibrated kappa = factor * warm-up RMSE
    geco_alpha: float = 0.99  # moving-average factor of the constraint
    geco_rate: float = 0.01  # nu: log(lambda) += nu * C_ma per step, C = MSE / kappa^2 - 1 (relative)
    geco_max_log_step: float = 0.05  # bound on |change of log(lambda)| per step
    geco_warmup: int = 200  # steps before lambda updates start (>= calibration steps)
    geco_log_lambda_offset: float = 0.0  # log(lambda_init) = log(D / 2) + offset (D/2: Gaussian likelihood)
    # 3.5 (x33): where the tolerance cannot be met (kappa calibrated beyond what the decoder reaches) lambda
    # stops there instead of growing until the reconstruction drowns the similarity term; on CIFAR-10, where it
    # is met, lambda peaks at 14-44x. 2.5 gains <= 0.003 there and loses 0.003-0.006 on other features
    # (BENCHMARKS.md, GECO's range)
    geco_log_lambda_range: float = 3.5  # log(lambda) stays within log(lambda_init) +- range
    # --- optimisation -------------------------------------------------------
    batch_size: int = 400  # global batch (all replicas)
    steps: int = 5000  # total training steps (a resumed run continues to this count)
    learning_rate: float = 1e-4  # Adam, encoder and decoder
    learning_rate_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to 0 at `steps`
    critic_learning_rate: float = 1e-4  # Adam, the adversarial critics
    seed: int = 0  # every random draw (initialisation, batches, sampling, anchors)
    jit_compile: Literal["auto", "true", "false"] = "auto"  # XLA; auto: on GPUs/TPUs, off on CPUs (BENCHMARKS.md)
    steps_per_execution: int = 50  # steps per tf.function call (lowered to land on log/eval/checkpoint steps)
    mixed_precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"  # Keras dtype policy
    # --- logging / evaluation -----------------------------------------------
    log_every: int = 100  # steps between TensorBoard scalars
    eval_every: int = 1000  # steps between mAP evaluations (0 = only at the end)
    eval_queries: int = 1000  # held-out queries for the periodic evaluation
    checkpoint_every: int = 1000  # steps between checkpoints
    checkpoints_to_keep: int = 3  # newest checkpoints kept
    final_eval_queries: Literal["q10k", "q1k"] = "q10k"  # query set of the final evaluation (tbhvae.protocol)

    def __post_init__(self):
        if isinstance(self.jit_compile, bool):  # Config(jit_compile=True) reads as "true"
            object.__setattr__(self, "jit_compile", str(self.jit_compile).lower())

    def validate(self) -> "Config":
        for key, kind in _FIELD_TYPES.items():
            value = getattr(self, key)
            if not _has_type(value, kind):
                raise ConfigError(f"config key '{key}' must be {kind.__name__}, got {type(value).__name__} "
                                  f"{value!r}")
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}; got '{value}'")
        for key in ("bits", "continuous_dim", "hidden_dim", "batch_size", "steps",
                    "steps_per_execution", "log_every", "checkpoint_every", "eval_queries",
                    "checkpoints_to_keep", "anchors", "nearest_anchors", "distillhash_neighbours"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key '{key}' must be > 0, got {getattr(self, key)}")
        for key in ("learning_rate", "critic_learning_rate", "geco_rate", "geco_max_log_step",
                    "geco_log_lambda_range", "similarity_scale"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key '{key}' must be > 0, got {getattr(self, key)}")
        if not 0 <= self.geco_alpha < 1:
            raise ConfigError(f"config key 'geco_alpha' must be in [0, 1), got {self.geco_alpha}")
        for key in ("similarity_weight", "decorrelation_weight", "greedyhash_penalty_weight", "reconstruction_weight",
                    "binary_kl_weight", "adversarial_weight", "tc_alpha", "tc_beta", "tc_gamma",
                    "pseudolabel_balance_weight", "pseudolabel_quantisation_weight", "distillhash_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.nearest_anchors > self.anchors:
            raise ConfigError(f"config key 'nearest_anchors' must be <= anchors ({self.anchors}), "
                              f"got {self.nearest_anchors}")
        if self.eval_every < 0:
            raise ConfigError(f"config key 'eval_every' must be >= 0, got {self.eval_every}")
        if self.pseudolabel_clusters < 2:
            raise ConfigError(f"config key 'pseudolabel_clusters' must be >= 2, got {self.pseudolabel_clusters}")
        if self.geco_kappa == 0 and self.geco_warmup < self.geco_calibration_steps:
            raise ConfigError("config key 'geco_warmup' must be >= 'geco_calibration_steps' when "
                              "kappa is calibrated (geco_kappa=0)")
        return self

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes).validate()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def describe_keys() -> str:
    """One line per config key: name, type, default and the comment beside it in `Config`.

    Read from this module's source, so `train.py --help` cannot go stale.
    """
    comments = {}
    for line in inspect.getsource(Config).splitlines():
        match = re.match(r"\s+(\w+): [^=]+ = [^#]*#\s*(.*)", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return "\n".join(f"  {field.name} ({_describe_type(field.name)}, default {field.default!r}): "
                     f"{comments.get(field.name, '')}".rstrip(": ")
                     for field in dataclasses.fields(Config))


_HINTS = typing.get_type_hints(Config)
CHOICES = {key: typing.get_args(hint) for key, hint in _HINTS.items() if typing.get_origin(hint) is Literal}
_FIELD_TYPES = {key: str if key in CHOICES else hint for key, hint in _HINTS.items()}
# Values that earlier versions wrote to config.json, read as today's names.
_RENAMED_VALUES = {"final_eval_queries": {"all": "q10k", "per_class_100": "q1k"},
                   "jit_compile": {False: "false", True: "true"}}


def _describe_type(key: str) -> str:
    return " | ".join(CHOICES[key]) if key in CHOICES else _FIELD_TYPES[key].__name__


def _has_type(value, kind) -> bool:
    """isinstance, with ints accepted as floats and bools refused as numbers."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _parse_value(key: str, text: str):
    kind = _FIELD_TYPES[key]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"override '{key}={text}': expected a boolean (true/false)")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"override '{key}={text}': expected a value of type {kind.__name__}") from None


def apply_overrides(config: Config, overrides: typing.Iterable[str]) -> Config:
    """Applies `key=value` strings to `config`; raises ConfigError on unknown keys/types."""
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override '{item}': expected key=value")
        if key not in _FIELD_TYPES:
            close = difflib.get_close_matches(key, list(_FIELD_TYPES), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"override '{item}': unknown config key '{key}'{hint}")
        changes[key] = _parse_value(key, value)
    return config.replace(**changes)


def from_dict(values: dict, where: str) -> Config:
    """Builds a Config from a dict (e.g. a saved config.json), checking keys and types."""
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s) {', '.join(unknown)}")
    values = {key: _RENAMED_VALUES.get(key, {}).get(value, value) for key, value in values.items()}
    for key, value in values.items():
        kind = _FIELD_TYPES[key]
        if not _has_type(value, kind):
            raise ConfigError(f"{where}: config key '{key}' must be {kind.__name__}, "
                              f"got {type(value).__name__} {value!r}")
    return Config(**{k: _FIELD_TYPES[k](v) for k, v in values.items()}).validate()


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every config shipped in the package `tbhvae.configs` (the repository's configs/)."""
    try:
        folder = importlib.resources.files("tbhvae.configs")
    except ModuleNotFoundError:  # a source checkout used without `pip install`: the folder itself
        folder = Path(__file__).resolve().parents[1] / "configs"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir()
            if entry.name.endswith(".py") and not entry.name.startswith("_")}


def load_config(path: str | os.PathLike) -> Config:
    """Loads a config file (`.py` with `get_config()`, or `.json`), or a shipped config by name."""
    path = Path(path)
    if not path.is_file():
        shipped = shipped_configs()
        if path.name in shipped and path.name == str(path):
            path = shipped[path.name]
        else:
            raise ConfigError(f"config file {path} not found; give a path or the name of a shipped config "
                              f"({', '.join(sorted(shipped))})")
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return from_dict(values, str(path))
    spec = importlib.util.spec_from_file_location(f"tbhvae_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path}: a config file must define get_config() -> tbhvae.config.Config")
        config = module.get_config()
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # e.g. Config(unknown_key=...) or a bad value
        raise ConfigError(f"{path}: {err}") from None
    except SystemExit as err:  # sys.exit() in the file must not end the program as if it had succeeded
        raise ConfigError(f"{path}: exits (SystemExit {err.code!r}) instead of returning a Config "
                          f"from get_config()") from None
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not Config")
    return config.validate()
