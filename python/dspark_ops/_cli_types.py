"""argparse types and the parser class of the command line: a bad argument is reported in one line
(``dspark generate: error: argument --top-p: must be in (0, 1], got 1.5``) with exit code 2, before
any model is loaded."""
from __future__ import annotations

import argparse
import math
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def int_at_least(low: int):
    """An integer >= low (counts: 1; sizes that may be 0 to mean off: 0)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """A finite number in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        value = _number(text, float)
        if value < low or (low_open and value == low) or value > high:
            left = "(" if low_open else "["
            right = "]" if math.isfinite(high) else ")"
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {high:g}{right}, got {value:g}")
        return value
    return parse


nonnegative_float = float_in(0.0)
positive_float = float_in(0.0, low_open=True)
top_p = float_in(0.0, 1.0, low_open=True)


def non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return text


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def prompt_source(text: str) -> str:
    """A prompt source of ``dspark train-draft --sources``."""
    from .train.data import SOURCES

    if text not in SOURCES:
        raise argparse.ArgumentTypeError(f"unknown prompt source {text!r} (known: {', '.join(SOURCES)})")
    return text


def model_name(text: str) -> str:
    """A model fetch-model knows by name."""
    from .models.fetch import _source

    try:
        _source(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def model_name_or_dir(text: str) -> str:
    """A Hugging Face model folder, or a model fetch-model knows by name."""
    return text if Path(text).is_dir() else model_name(text)


def missing_extra(module: str, extra: str, purpose: str) -> str | None:
    """The one-line message for an optional dependency that is not installed (None when it is)."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return None
    return f'{purpose} needs {module}: pip install "dspark_ops[{extra}]"'
