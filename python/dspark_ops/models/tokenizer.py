"""Text <-> token ids for a model folder (tokenizer.json + tokenizer_config.json), without transformers."""
from __future__ import annotations

import json
from pathlib import Path


class TextTokenizer:
    """Encode/decode and chat formatting with the folder's own chat template (rendered with jinja2)."""

    def __init__(self, folder):
        from tokenizers import Tokenizer

        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(file))
        cfg_file = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.bos_token_id = self._id(self.config.get("bos_token"))
        self.eos_token_id = self._id(self.config.get("eos_token"))

    def _id(self, token) -> int | None:
        if isinstance(token, dict):          # older configs store AddedToken dicts
            token = token.get("content")
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a chat turn: EOS and ``<|im_end|>`` where the vocabulary has them, each once."""
        ids = (self.eos_token_id, self.tokenizer.token_to_id("<|im_end|>"))
        return list(dict.fromkeys(t for t in ids if t is not None))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids; BOS only if the config asks."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.config.get("add_bos_token") and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        template = self.config.get("chat_template")
        if not template:
            raise ValueError("this tokenizer has no chat_template; encode plain text instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=self.config.get("bos_token") or "",
                                                eos_token=self.config.get("eos_token") or "")

    def encode_chat(self, messages: list[dict] | str, *, add_generation_prompt: bool = True) -> list[int]:
        """Ids of a chat prompt; a plain string is one user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.tokenizer.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
                                     add_special_tokens=False).ids
