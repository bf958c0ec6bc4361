"""CLIP tokenization with the ``tokenizers`` library (no transformers, no torch).

A tokenizer folder holds either ``tokenizer.json`` (what ``transformers`` saves) or the
original CLIP files ``vocab.json`` + ``merges.txt`` (Stable Diffusion 1.x's ``tokenizer/``);
the latter is built into the same byte-level BPE pipeline as CLIP's fast tokenizer:
NFC + whitespace collapse + lowercase, CLIP's split pattern, byte-level alphabet, ``</w>``
end-of-word suffix, and ``<|startoftext|> ... <|endoftext|>`` around every prompt.
Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` when present.

Prompts become int64 ids of length ``model_max_length`` (77), padded on the right with the
pad token (CLIP: the end token). A prompt longer than that is an ``InputError``, never cut.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import InputError, IntegrityError
from ..folder.jsonfile import read_json_object

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP's pre-tokenization: its special tokens, English contractions, letter runs, single
# digits, and runs of other non-space characters.
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
                r"|[^\s\p{L}\p{N}]+")


def _token_text(value: Any) -> str | None:
    """A special token as a string; configs store either a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise IntegrityError(f"{path} line {n} is not a merge pair: {line[:40]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], bos: str = BOS,
                   eos: str = EOS, unk: str = EOS) -> Tokenizer:
    """CLIP's byte-level BPE tokenizer from its vocabulary and merges."""
    for token in (bos, eos, unk):
        if token not in vocab:
            raise IntegrityError(f"the tokenizer vocabulary lacks the special token {token!r}")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, dropout=None))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(dict.fromkeys([bos, eos, unk])))
    tok.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False)
    return tok


class ClipTokenizer:
    """Prompts -> int64 ids (n, model_max_length) for the text encoder."""

    def __init__(self, tokenizer: Tokenizer, model_max_length: int, pad_id: int, bos_id: int,
                 eos_id: int):
        self.tokenizer = tokenizer
        self.model_max_length = int(model_max_length)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        tokenizer.no_padding()
        tokenizer.no_truncation()

    @classmethod
    def load(cls, folder: str | os.PathLike, model_max_length: int | None = None) -> "ClipTokenizer":
        """From ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``, in ``folder``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise IntegrityError(f"tokenizer folder {folder} is missing; re-run the export")
        config = read_json_object(folder / "tokenizer_config.json", IntegrityError, optional=True)
        specials = {**read_json_object(folder / "special_tokens_map.json", IntegrityError, optional=True),
                    **config}
        bos = _token_text(specials.get("bos_token")) or BOS
        eos = _token_text(specials.get("eos_token")) or EOS
        pad = _token_text(specials.get("pad_token")) or eos
        unk = _token_text(specials.get("unk_token")) or EOS
        if (folder / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as err:  # tokenizers raises a bare Exception for a bad file
                raise IntegrityError(f"{folder / 'tokenizer.json'} cannot be loaded "
                                     f"({' '.join(str(err).split())})") from err
            if tok.post_processor is None:
                tok.post_processor = processors.RobertaProcessing(
                    (eos, _token_id(tok, eos)), (bos, _token_id(tok, bos)),
                    trim_offsets=False, add_prefix_space=False)
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = read_json_object(folder / "vocab.json", IntegrityError)
            tok = build_clip_bpe(vocab, _read_merges(folder / "merges.txt"), bos, eos, unk)
        else:
            raise IntegrityError(f"tokenizer folder {folder} has neither tokenizer.json nor "
                                 "vocab.json + merges.txt; re-run the export")
        if model_max_length is None:
            value = config.get("model_max_length", 77)
            model_max_length = value if isinstance(value, int) and 2 <= value <= 4096 else 77
        return cls(tok, model_max_length, _token_id(tok, pad), _token_id(tok, bos),
                   _token_id(tok, eos))

    def token_ids(self, prompt: str) -> list[int]:
        """Ids of one prompt with its start and end tokens, unpadded."""
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be text, got {type(prompt).__name__}")
        return list(self.tokenizer.encode(prompt).ids)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """int64 (len(prompts), model_max_length); ``InputError`` for an over-long prompt."""
        n = self.model_max_length
        out = np.full((len(prompts), n), self.pad_id, dtype=np.int64)
        for i, prompt in enumerate(prompts):
            ids = self.token_ids(prompt)
            if len(ids) > n:
                short = prompt if len(prompt) <= 40 else prompt[:40] + "..."
                raise InputError(f"prompt is too long: {len(ids)} tokens, the text encoder takes {n} "
                                 f"(including start and end); shorten {short!r}")
            out[i, :len(ids)] = ids
        return out


def _token_id(tok: Tokenizer, token: str) -> int:
    idx = tok.token_to_id(token)
    if idx is None:
        raise IntegrityError(f"the tokenizer has no token {token!r}; re-run the export")
    return int(idx)
