"""Train a hashing model; see `python train.py --help` and README.md."""
from tbhvae.cli.train import run

if __name__ == "__main__":
    run()
