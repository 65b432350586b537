"""Sample checkpoints generated on the spot, so that demos and tests need no downloads."""
