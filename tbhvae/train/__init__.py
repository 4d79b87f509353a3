"""Training under tf.distribute.

  loop        train(): the input pipeline, building / restoring the model, fit(), the final
              evaluation that writes metrics.json
  distribute  the strategy, chief detection, collectives across workers, XLA and steps per
              execution, the precision policy, and every TensorFlow / Keras workaround
  monitor     the TrainingMonitor callback (logging, periodic evaluation, checkpoints), its clock,
              the progress display, SIGTERM handling, TensorBoard summaries
  rundir      the run directory: the one owner of config.json, data.json, checkpoints/, metrics.json
"""
from tbhvae.train.distribute import is_chief, make_strategy, use_xla
from tbhvae.train.loop import train
from tbhvae.train.rundir import RunDirectory, RunDirError, TrainingError, finished_steps

__all__ = ["RunDirError", "RunDirectory", "TrainingError", "finished_steps", "is_chief", "make_strategy", "train",
           "use_xla"]
