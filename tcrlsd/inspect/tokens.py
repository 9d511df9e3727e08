"""Token strings for the coloured response: the policy's ``tokenizer.json``, read with ``tokenizers``.

Each response token's text is what it adds to the decoded text (decoded after its predecessor, so
SentencePiece-style word-initial spaces survive); a character whose UTF-8 bytes span several
byte-level tokens goes to the token that completes it. The pieces concatenate to the response.
Only the Rust ``tokenizers`` library is used (no transformers, no torch), so this costs tens of
milliseconds. Without a tokenizer the views fall back to token ids, position by position, and
show ``response_text`` as stored.

Where the tokenizer comes from: ``--policy DIR`` when given; else the scores' ``teacher_checkpoint``
when it names an existing folder with a ``tokenizer.json`` (it is the policy path the score stage
ran with, relative to the folder DVC ran in: tried as given, then relative to the iteration
folder's grandparent, the repository root for ``data/iter-NNNN``). Teacher and student share one
tokenizer (the same weights, or a lagged copy of them).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TokenText", "find_tokenizer"]


class TokenText:
    """Decode token ids one by one with a ``tokenizer.json``."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"{p}: no tokenizer.json there (a policy folder in Hugging Face format is expected)")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception for a malformed file
            raise ValueError(f"{file}: not a readable tokenizer.json: {exc}") from None
        self.source = str(file)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _after(self, before: list[int], ids: list[int]) -> str:
        """Text that ``ids`` add after ``before`` (keeps word-initial spaces that decoders such as
        SentencePiece's drop from a sequence's first token)."""
        if not before:
            return self._decode(ids)
        ctx = self._decode(before)
        full = self._decode(before + ids)
        return full[len(ctx):] if full.startswith(ctx) else self._decode(ids)

    def pieces(self, ids: list[int]) -> list[str]:
        """One string per id; they concatenate to the decoded text (special tokens kept: an EOS in
        the response is shown, not dropped). A character whose bytes span several tokens is given
        to the token that completes it; the tokens before it get ''."""
        ids = list(ids)
        singles = self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
        pairs = self._tok.decode_batch([ids[i - 1:i + 1] for i in range(1, len(ids))], skip_special_tokens=False)
        out: list[str] = []
        i = 0
        while i < len(ids):
            if i == 0:
                text = singles[0]
            else:
                full, prev = pairs[i - 1], singles[i - 1]
                text = full[len(prev):] if full.startswith(prev) else singles[i]
            if "\ufffd" not in text:
                out.append(text)
                i += 1
                continue
            for j in range(i + 1, min(i + 4, len(ids))):  # a UTF-8 character is at most 4 bytes
                merged = self._after(ids[max(i - 1, 0):i], ids[i:j + 1])
                if "\ufffd" not in merged:
                    out += [""] * (j - i) + [merged]
                    i = j + 1
                    break
            else:  # not a split character: a token that really decodes to U+FFFD
                out.append(text)
                i += 1
        return out


def find_tokenizer(policy: str | os.PathLike | None, checkpoints: list[str], iter_dir: Path) -> TokenText | None:
    """The tokenizer of ``policy`` if given (errors if unusable), else of the first checkpoint found."""
    if policy is not None:
        return TokenText(policy)
    for ck in checkpoints:
        if not ck:
            continue
        for base in (Path.cwd(), iter_dir.resolve().parent.parent):
            cand = base / ck
            if (cand / "tokenizer.json").is_file():
                return TokenText(cand)
    return None
