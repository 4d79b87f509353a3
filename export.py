"""Export a trained run as SavedModel + TFLite hash encoders; see `python export.py --help`."""
from tbhvae.cli.export import run

if __name__ == "__main__":
    run()
