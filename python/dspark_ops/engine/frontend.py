"""The convenience API over ``add_request`` / ``step``: whole lists of prompts, run to completion or streamed."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from .requests import SamplingParams


class BatchFrontEnd:
    """``generate`` and ``stream`` for an engine with ``add_request``, ``step``, ``has_work`` and ``finished``."""

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
                 stop_token_ids: Iterable[int] = ()) -> list[list[int]]:
        """Generate for every prompt (request i uses seed + i); returns the new token ids of each."""
        ids = self._submit(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids)
        while self.has_work:
            self.step()
        return [self.finished[i].output for i in ids]

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
               stop_token_ids: Iterable[int] = ()) -> Iterator[tuple[int, list[int]]]:
        """Like :meth:`generate`, yielding (prompt index, new tokens) as steps complete."""
        ids = self._submit(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids)
        index = {rid: i for i, rid in enumerate(ids)}
        while self.has_work:
            for rid, toks in self.step().items():
                if rid in index and toks:
                    yield index[rid], toks

    def _submit(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids) -> list[int]:
        stop = tuple(int(t) for t in stop_token_ids)
        params = [SamplingParams(max_new_tokens, temperature, top_k, top_p, min_p, seed + i, stop)
                  for i in range(len(prompts))]
        for p, prompt in zip(params, prompts):  # validate all before queueing any
            p.check()
            if len(prompt) == 0:
                raise ValueError("prompt is empty")
        return [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]
