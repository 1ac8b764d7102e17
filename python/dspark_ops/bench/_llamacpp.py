"""llama.cpp's own sources, as the llama-cpp-python source distribution on PyPI vendors them.

The benchmarks and the interoperability tests use its `convert_hf_to_gguf.py` (Hugging Face folder -> GGUF)
and its CMake tools (llama-server). The sdist is downloaded once with pip into $DSPARK_HOME/llama.cpp/VERSION
and only `vendor/llama.cpp` is extracted; converted GGUFs and the CMake build (build-cpu-native, for this
CPU's ISA like the llama-cpp-python peer) are kept beside it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from ..models.fetch import dspark_home

VERSION = "0.3.36"   # llama-cpp-python release whose vendored llama.cpp is used


def root() -> Path:
    return dspark_home() / "llama.cpp" / VERSION


def sdist() -> Path:
    """The llama-cpp-python sdist, downloaded from the package index on first use."""
    path = root() / f"llama_cpp_python-{VERSION}.tar.gz"
    if not path.is_file():
        root().mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(root()), f"llama-cpp-python=={VERSION}"], check=True, capture_output=True)
    return path


def source() -> Path:
    """llama.cpp's source tree (vendor/llama.cpp of the sdist), extracted on first use."""
    src = root() / "src"
    if not (src / "convert_hf_to_gguf.py").is_file():
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        tmp = root() / "src.partial"
        with tarfile.open(sdist()) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        tmp.rename(src)
    return src


def tool(name: str) -> Path:
    """A llama.cpp program (e.g. llama-server), built with CMake from the vendored source on first use."""
    build = root() / "build-cpu-native"
    exe = build / "bin" / name
    if not exe.is_file():
        configure = ["cmake", "-S", str(source()), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
        for cmd in (configure, ["cmake", "--build", str(build), "--target", name, "-j", str(os.cpu_count() or 1)]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"building llama.cpp's {name}: {' / '.join(tail)}")
    return exe


def convert_hf_to_gguf(folder, *, outtype: str = "f32", name: str | None = None, target_dir=None) -> Path:
    """Convert a Hugging Face model folder with llama.cpp's converter (a drafter needs its target's folder, whose
    tokenizer and embeddings it takes); cached until the folder's files change."""
    folder = Path(folder).resolve()
    name = name or f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"   # two folders, two files
    out = root() / "gguf" / f"{name}-{outtype}.gguf"
    newest = max(p.stat().st_mtime for p in folder.iterdir())
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = source()
    partial = out.with_suffix(".partial")
    target = ["--target-model-dir", str(target_dir)] if target_dir is not None else []
    res = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), *target, "--outtype", outtype,
                          "--outfile", str(partial)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"convert_hf_to_gguf.py {folder.name} --outtype {outtype}: {' / '.join(tail)}")
    partial.rename(out)
    return out
