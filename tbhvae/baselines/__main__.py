# python -m tbhvae.baselines: the same command as tbhvae-baselines. No docstring here, so that --help
# shows tbhvae.cli.baselines's description, as the console script does.
from tbhvae.cli.baselines import run

run()
