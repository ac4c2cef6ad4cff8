"""One package per method (network, key detection, configuration inference); shared blocks in ``blocks``."""
