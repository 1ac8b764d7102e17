"""Wheel metadata taken from the torch the extension is compiled against.

A scikit-build-core dynamic-metadata provider (``[[tool.dynamic-metadata]]`` in
pyproject.toml). The compiled ``_C`` library links torch's C++ API, whose ABI
changes between torch minor releases, so every wheel requires the torch release
it was built against (``torch==2.14.*``).

A wheel built from a checkout (the binary one handed out) also names that torch
build in its version's local label (``0.1.0+torch2.14.cu130``, ``.cpu`` for a
CPU-only torch), as CUDA library wheels name theirs. An sdist is source for any
torch: it keeps the plain version and requires just ``torch``, its dependencies
marked Dynamic; a wheel built from it (an unpacked sdist has a PKG-INFO) keeps
that plain version too, since pip rejects a wheel whose version differs from
the sdist it came from, and pins the torch it saw.
"""
from __future__ import annotations

from pathlib import Path


class TorchPin:
    def __init__(self) -> None:
        self.state = "metadata_wheel"

    def build_state(self, state: str) -> None:
        self.state = state

    def dynamic_wheel(self, settings) -> dict[str, bool]:
        return {"dependencies": True}

    def dynamic_metadata(self, settings, project) -> dict:
        if self.state == "sdist":
            return {"dependencies": ["torch"]}
        import torch

        release = torch.__version__.split("+")[0]
        minor = ".".join(release.split(".")[:2])
        pin = {"dependencies": [f"torch=={minor}.*"]}
        if Path("PKG-INFO").is_file():
            return pin
        build = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        return {**pin, "version": f"{project['version']}+torch{minor}.{build}"}
