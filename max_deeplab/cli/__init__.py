"""Command-line verbs. Each module here exposes `main(argv: list[str]) -> int`."""
