"""The ``ckpt`` command: parses arguments, calls ops, prints tables, JSON and progress."""
