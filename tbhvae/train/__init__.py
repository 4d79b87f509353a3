"""Training under tf.distribute: the run directory (`rundir`); the trainer itself is in tbhvae.training."""
