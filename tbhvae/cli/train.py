"""Train TBH / TBH-VAE: `python train.py --config configs/cifar10_tbhvae.py [--features F.npz]`.

Exit codes: 0 done (metrics.json written), 2 bad input or a stop that needs
attention (one `error: ...` line on stderr saying what to do; SIGTERM and a
non-finite loss keep the checkpoints, so rerunning the same command resumes).
"""
from __future__ import annotations

import json

from absl import flags
from absl import logging as absl_logging

from tbhvae.cli import expect_no_arguments, fail, run_main, start_tensorflow

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags (called by `run`, so that importing this module defines none)."""
    from tbhvae.config import describe_keys  # no TensorFlow: --help stays fast

    flags.DEFINE_string("config", "cifar10_tbhvae", "Config: the name of a shipped one (configs/, e.g. cifar10_tbh) "
                        "or a file (.py with get_config(), or .json).")
    flags.DEFINE_bool("print_config", False, "Print the resolved config (file + overrides) as JSON and exit.")
    flags.DEFINE_multi_string("set", [], "Config override key=value (repeatable). Keys:\n" + describe_keys())
    flags.DEFINE_string("model_dir", None, "Run directory (default runs/<config name>_<bits>b); "
                        "rerunning with the same directory resumes.")
    flags.DEFINE_string("features", None, "Feature .npz (skips TFDS download and backbone extraction).")
    flags.DEFINE_string("images", None, "Image source to extract features from: tfds:NAME or a JPEG .npz "
                        "(config key images).")
    flags.DEFINE_string("weights", None, "Backbone weights for extraction: imagenet, none or a weights file "
                        "(config key backbone_weights).")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir holding prepared datasets (config key data_dir).")
    flags.DEFINE_integer("bits", None, "Code length M (overrides the config).")
    flags.DEFINE_integer("steps", None, "Total training steps (overrides the config).")
    flags.DEFINE_enum("strategy", "auto", ["auto", "default", "mirrored", "multiworker"],
                      "tf.distribute strategy; multiworker reads the cluster from TF_CONFIG.")
    flags.DEFINE_bool("reevaluate", False, "Evaluate a finished run again (otherwise rerunning a finished run "
                      "only says where its metrics are).")
    flags.DEFINE_bool("fresh", False, "Discard the run already in --model_dir (only the files tbhvae wrote; "
                      "refused for a directory that is not a tbhvae run) and start over.")


def load_checked_config():
    """--config plus overrides, validated without importing TensorFlow."""
    from tbhvae import config as config_lib
    from tbhvae.config import ConfigError

    try:
        config = config_lib.load_config(FLAGS.config)
    except ConfigError:
        raise
    except Exception as err:  # the config file is user Python code: any failure is a config error
        raise ConfigError(f"{FLAGS.config}: {type(err).__name__}: {err}; fix the config file "
                          f"(valid keys: tbhvae/config.py)") from None
    overrides = list(FLAGS.set)
    for flag, key in (("features", "features"), ("images", "images"), ("weights", "backbone_weights"),
                      ("data_dir", "data_dir"), ("bits", "bits"), ("steps", "steps")):
        if getattr(FLAGS, flag) is not None:
            overrides.append(f"{key}={getattr(FLAGS, flag)}")
    return config_lib.apply_overrides(config, overrides)


def main(argv):
    expect_no_arguments(argv)
    from tbhvae.config import ConfigError  # after flag parsing: --help stays fast
    from tbhvae.data import DataError, load_features

    try:  # cheap checks first, so bad input fails fast and before TensorFlow starts
        config = load_checked_config()
        if FLAGS.print_config:
            print(config.to_json())
            return
        feature_set = load_features(config.features) if config.features else None
    except (ConfigError, DataError) as err:
        fail(str(err))
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # TF's per-checkpoint INFO lines
    start_tensorflow()
    from tbhvae import train

    model_dir = FLAGS.model_dir or f"runs/{config.name}_{config.bits}b"
    finished = None if FLAGS.fresh or FLAGS.reevaluate else train.finished_steps(model_dir, config)
    if finished is not None:
        print(f"run already complete ({finished} steps); metrics in {model_dir}/metrics.json "
              f"(--reevaluate to evaluate again, --steps N to train further)")
        return
    try:
        strategy = train.make_strategy(FLAGS.strategy)  # first TF op: multiworker needs that
        metrics = train.train(config, model_dir, strategy=strategy, fresh=FLAGS.fresh, feature_set=feature_set)
    except (ConfigError, DataError, train.TrainingError) as err:
        fail(str(err))
    summary = {k: metrics[k] for k in ("model", "bits", "steps", "map@1000", "map", "precision@r2",
                                       "train_seconds", "examples_per_second") if k in metrics}
    print(json.dumps(summary, indent=2))
    if train.is_chief(strategy):
        print(f"metrics written to {model_dir}/metrics.json; TensorBoard: tensorboard --logdir {model_dir}/logs")


def run():
    """Console entry point `tbhvae-train`."""
    define_flags()
    run_main(main, __name__)


if __name__ == "__main__":
    run()
