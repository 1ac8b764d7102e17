"""Creates a virtual env that shares distributions already installed here, without copying them.

    python scripts/fresh_venv.py DEST torch [scikit-build-core cmake ninja ...]

DEST is a new venv of this interpreter holding only pip and what is named, with
everything those distributions require: each one's top-level files and its
.dist-info are symlinked from this environment's site-packages, so pip in DEST
sees them as installed (a torch of several GB costs nothing) and installs the
rest of what a package declares from the index, as on a user's machine.
"""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(names: list[str]) -> dict[str, md.Distribution]:
    """The named distributions and, recursively, what they require (markers evaluated here, no extras)."""
    found: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        dist = md.distribution(todo.pop())
        name = canonicalize_name(dist.metadata["Name"])
        if name in found:
            continue
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def top_level_entries(dist: md.Distribution) -> set[str]:
    """What the distribution put directly into site-packages (scripts and caches left out)."""
    return {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}


def main() -> None:
    dest, names = Path(sys.argv[1]).resolve(), sys.argv[2:]
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    dest_site = Path(subprocess.run([dest / "bin" / "python", "-c", purelib], check=True, capture_output=True,
                                    text=True).stdout.strip())
    present = {canonicalize_name(d.metadata["Name"]) for d in md.distributions(path=[str(dest_site)])}
    for name, dist in sorted(closure(names).items()):
        if name in present:      # pip and setuptools of the new venv stay its own
            continue
        for entry in sorted(top_level_entries(dist)):
            link = dest_site / entry
            if not link.exists():
                link.symlink_to(Path(dist.locate_file(entry)).resolve())
        print(f"linked {name} {dist.version}")


if __name__ == "__main__":
    main()
