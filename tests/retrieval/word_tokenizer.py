"""A tiny tokenizer with Hugging Face fast-tokenizer call semantics, for chunking tests.

Tokens are runs of word characters and single other non-space characters; whitespace belongs to
no token (as in BERT). With `byte_pieces=True` a token with non-ASCII characters is split into
one piece per UTF-8 byte, each with the offsets of the character it came from, the way
byte-level tokenizers report several tokens for one character.
"""

import re
import zlib

TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class WordTokenizer:
    def __init__(self, byte_pieces: bool = False, vocab_size: int = 50_000) -> None:
        self.byte_pieces = byte_pieces
        self.vocab_size = vocab_size

    def token_id(self, piece: str | bytes) -> int:
        data = piece.encode("utf-8", errors="surrogatepass") if isinstance(piece, str) else piece
        return zlib.crc32(data) % self.vocab_size

    def __call__(self, text: str, *, add_special_tokens: bool, return_offsets_mapping: bool) -> dict:
        assert not add_special_tokens and return_offsets_mapping
        ids, offsets = [], []
        for match in TOKEN.finditer(text):
            if self.byte_pieces and not match.group().isascii():
                for i, char in enumerate(match.group(), start=match.start()):
                    for byte in char.encode("utf-8", errors="surrogatepass"):
                        ids.append(self.token_id(bytes([byte])))
                        offsets.append((i, i + 1))
            else:
                ids.append(self.token_id(match.group()))
                offsets.append(match.span())
        return {"input_ids": ids, "offset_mapping": offsets}
