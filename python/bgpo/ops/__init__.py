"""The ops of bgpo: one module per op, each with its custom-op registration and pure-PyTorch path."""
