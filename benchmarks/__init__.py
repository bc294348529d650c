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


def add_verifier_argument(parser) -> None:
    """``--verifier`` of the CLIs whose lossless FREE / frozen runs take the model's verifier (relax runs verify
    per step whatever it says), so that figures recorded before block became the digits default rerun."""
    from freedit.runtime.contract import VERIFIERS

    parser.add_argument("--verifier", choices=VERIFIERS, default=None,
                        help="how lossless FREE and frozen verify a window; default: the model's (block for the "
                        "bundled digits model); \"step\" reproduces records made before block became its default")


def applied_rules(result) -> dict:
    """The rules a run applied (its GenerationResult settings): {"verifier": ...} for speculative samplers and
    {"draft_guidance": ...} where guided FREE applied one; {} for the others."""
    return {k: result.settings[k] for k in ("verifier", "draft_guidance") if k in result.settings}
