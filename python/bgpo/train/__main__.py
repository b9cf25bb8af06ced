"""``python -m bgpo.train [--config CONFIG.yaml | --preset NAME] [--resume] [key=value ...]``."""
import sys

from ..cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
