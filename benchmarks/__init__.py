"""Latency, speed-up and quality benchmarks; ``quality`` holds the digits evaluator (numpy only)."""


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a recorded run came from, shell-quoted so that empty or spaced arguments survive."""
    import shlex
    import sys

    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def add_draft_guidance_argument(parser) -> None:
    """``--draft-guidance`` of the CLIs that sample with FREE, so that figures recorded with either rule rerun."""
    from freedit.runtime.contract import DRAFT_GUIDANCE  # here, to keep this package's import light

    parser.add_argument("--draft-guidance", choices=DRAFT_GUIDANCE, default=None,
                        help="where guided FREE drafts take their guidance from; default: the model's (parent for "
                        "the bundled digits model); \"drafter\" reproduces records made before the option existed")


def applied_draft_guidance(result) -> dict:
    """{"draft_guidance": rule} where a run's guided FREE applied one (its GenerationResult settings), else {}."""
    return {"draft_guidance": result.settings["draft_guidance"]} if "draft_guidance" in result.settings else {}
