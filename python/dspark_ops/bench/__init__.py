"""Benchmarks, one module each, shipped with the package: ``dspark bench NAME [ARGS]`` or
``python -m dspark_ops.bench.NAME [ARGS]`` (``--help`` lists each one's options). Results and the
commands that produced them: bench/RESULTS.md in the source repository."""
from __future__ import annotations

import pkgutil


def names() -> list[str]:
    """The benchmarks of this package, by module name (modules named _... are their helpers)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
