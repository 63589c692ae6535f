"""Streaming text out of a token stream.

Tokens of a byte-level BPE can end in the middle of a UTF-8 character, and some tokenizers change how a
token is written depending on its neighbours, so text is decoded from all tokens so far and only the new,
complete suffix is emitted (a trailing U+FFFD, the mark of an incomplete character, is held back).
"""

from __future__ import annotations

from tokenizers import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = ""

    def push(self, tokens: list[int]) -> str:
        """Add tokens; return the text they complete."""
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        stable = text.rstrip("\ufffd")
        if not stable.startswith(self.emitted):  # a later token rewrote earlier text: emit nothing until it settles
            return ""
        new, self.emitted = stable[len(self.emitted):], stable
        return new

    def flush(self) -> str:
        """The rest of the text, incomplete characters included."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        rest = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return rest
