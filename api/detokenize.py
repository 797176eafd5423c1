"""Incremental detokenization: token ids in, printable text pieces out, never half a character."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes the whole token list and emits only the new suffix, holding back text that ends in a
    replacement character (an incomplete UTF-8 sequence split across tokens)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
