"""Plans and runs streamed, key-by-key jobs and writes their outputs atomically."""
