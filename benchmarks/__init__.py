"""Latency, speed-up and quality benchmarks; ``quality`` holds the digits evaluator (numpy only)."""


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a recorded run came from, shell-quoted so that empty or spaced arguments survive."""
    import shlex
    import sys

    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)
