"""freedit: FREE speculative sampling for Diffusion Transformers.

The import root maps onto the pipeline's top-level folders: ``freedit.export`` (export/),
``freedit.engine`` (engine/), ``freedit.runtime`` (runtime/), ``freedit.benchmarks``
(benchmarks/). An installed wheel maps them through pyproject.toml's package-dir; in a source
checkout (``python -m ...`` from the repository root) this package would shadow the installed one,
so the checkout's root joins the search path for those subpackages.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "runtime" / "__init__.py").is_file() and (_root / "export" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 - __path__ is defined for packages
