"""apla_rt.media.tokenizer: the CLIP BPE matches transformers' CLIPTokenizer (from vocab.json +
merges.txt and from tokenizer.json), refuses prompts over 77 tokens, and names what a broken
tokenizer folder lacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from rt_fakes import write_vocab_merges

from apla_rt.errors import InputError, IntegrityError
from apla_rt.media.tokenizer import ClipTokenizer, build_clip_bpe


PROMPTS = ["a man is skiing", "", "Spider  Man\tis SKIING on the beach, cartoon style!!",
           "it's 2023: naïve café, 日本 and emoji 🎿", "the skiing man <|endoftext|> again"]


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory) -> dict[str, Path]:
    """The same CLIP BPE as vocab.json + merges.txt and as transformers' tokenizer.json."""
    transformers = require("transformers")
    root = tmp_path_factory.mktemp("tok")
    write_vocab_merges(root / "bpe")
    saved = root / "json"
    transformers.CLIPTokenizer.from_pretrained(str(root / "bpe")).save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file()
    return {"bpe": root / "bpe", "json": saved}


@pytest.mark.parametrize("kind", ["bpe", "json"])
def test_tokenizer_matches_transformers(tokenizer_folders, kind):
    from transformers import CLIPTokenizer

    folder = tokenizer_folders[kind]
    ours = ClipTokenizer.load(folder)
    ref = CLIPTokenizer.from_pretrained(str(folder))
    ids = ours(PROMPTS)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77)
    assert ids.tolist() == want
    assert ours.token_ids("the man is skiing") == ref("the man is skiing").input_ids
    # merges are exercised: "skiing" is a single merged token
    vocab = json.loads((tokenizer_folders["bpe"] / "vocab.json").read_text())
    assert vocab["skiing</w>"] in ours.token_ids("skiing")
    assert ids[1, 2:].tolist() == [ours.eos_id] * 75  # padded with the end token


def test_tokenizer_refuses_long_prompts(tokenizer_folders):
    ours = ClipTokenizer.load(tokenizer_folders["bpe"])
    ours(["x" * 75])  # 75 characters + start + end = 77 tokens: fits
    with pytest.raises(InputError, match="prompt is too long: 78 tokens, the text encoder takes 77"):
        ours(["x" * 76])


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(IntegrityError, match="missing"):
        ClipTokenizer.load(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IntegrityError, match="neither tokenizer.json nor"):
        ClipTokenizer.load(tmp_path / "empty")
    with pytest.raises(IntegrityError, match="special token"):
        build_clip_bpe({"a": 0}, [])
