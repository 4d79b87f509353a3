"""Train TBH / TBH-VAE: `python train.py --config configs/cifar10_tbhvae.py [--features F.npz]`."""
from __future__ import annotations

import json

from absl import flags

from tbhvae.cli import fail, run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/cifar10_tbhvae.py", "Config file (.py with get_config(), or .json).")
flags.DEFINE_multi_string("set", [], "Config override key=value (repeatable).")
flags.DEFINE_string("model_dir", None, "Run directory (default runs/<config name>_<bits>b); "
                    "rerunning with the same directory resumes.")
flags.DEFINE_string("features", None, "Feature .npz (skips TFDS download and backbone extraction).")
flags.DEFINE_integer("bits", None, "Code length M (overrides the config).")
flags.DEFINE_integer("steps", None, "Total training steps (overrides the config).")
flags.DEFINE_enum("strategy", "auto", ["auto", "default", "mirrored", "multiworker"], "tf.distribute strategy.")
flags.DEFINE_bool("fresh", False, "Discard any run already in --model_dir and start over.")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {' '.join(argv[1:])}; use --flag=value")
    from tbhvae import config as config_lib  # after flag parsing: --help stays fast
    from tbhvae.config import ConfigError
    from tbhvae.data import DataError
    from tbhvae import training

    try:
        config = config_lib.load_config(FLAGS.config)
        overrides = list(FLAGS.set)
        for key in ("features", "bits", "steps"):
            if getattr(FLAGS, key) is not None:
                overrides.append(f"{key}={getattr(FLAGS, key)}")
        config = config_lib.apply_overrides(config, overrides)
        model_dir = FLAGS.model_dir or f"runs/{config.name}_{config.bits}b"
        strategy = training.make_strategy(FLAGS.strategy)
        metrics = training.train(config, model_dir, strategy=strategy, fresh=FLAGS.fresh)
    except (ConfigError, DataError, training.TrainingError) as err:
        fail(str(err))
    summary = {k: metrics[k] for k in ("model", "bits", "steps", "map@1000", "map", "precision@r2",
                                       "train_seconds", "examples_per_second") if k in metrics}
    print(json.dumps(summary, indent=2))
    print(f"metrics written to {model_dir}/metrics.json; TensorBoard: tensorboard --logdir {model_dir}/logs")


def run():
    run_main(main, __name__)


if __name__ == "__main__":
    run()
