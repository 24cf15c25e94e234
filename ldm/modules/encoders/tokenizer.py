"""Offline CLIP tokenizers for the SD 1.x and SD 2.x text encoders.

Both tokenizers are built from the byte-level BPE merges that open_clip ships
(`open_clip/bpe_simple_vocab_16e6.txt.gz`); nothing is downloaded.

SD 1.x (`openai/clip-vit-large-patch14`): the vocabulary is
    256 byte symbols + the same 256 with "</w>" + one entry per merge + 2 specials
    = 49,408 ids,    BOS "<|startoftext|>" = 49406,  EOS "<|endoftext|>" = 49407,
fed to a `transformers.CLIPTokenizer` (NFC, whitespace runs -> " ", lower case,
CLIP's word regex, byte-level BPE). It reproduces the reference tokenizer's ids;
open_clip's `SimpleTokenizer` does not on some Unicode (it runs ftfy first).
Sequences are  [BOS, content..., EOS, EOS, ...]  padded with EOS to 77 and
truncated to 75 content tokens so EOS stays.

SD 2.x (OpenCLIP ViT-H/14): open_clip's own tokenizer, padded with 0.

Long prompts (`max_length` 150, 225, ... = 75 x k content tokens, k >= 2): the caption is
tokenized once, cut to 75 x k content tokens, and laid out as k chunks of 77 positions,
each  [BOS, its 75 content tokens, EOS]  or, for the chunk where the caption ends and the
ones after it,  [BOS, rest..., EOS, pad, ...]  with pad = EOS (SD 1.x) or 0 (SD 2.x); a
chunk after the caption's end is  [BOS, EOS, pad, ...]. The ids are [B, 77 x k]; the
encoders encode each chunk on its own and concatenate the results along the sequence.
These are the ids AUTOMATIC1111 gives to the text encoder (its chunks when it does not
move a chunk's end back to a comma) and kohya's sd-scripts with `--max_token_length`.
"""
from __future__ import annotations

import functools
import gzip
from importlib import resources
from typing import Sequence

import open_clip
import torch
from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTokenizer

CONTEXT_LENGTH = 77
CHUNK_TOKENS = CONTEXT_LENGTH - 2  # content tokens per chunk of a long prompt
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary budget minus bytes and specials


@functools.lru_cache(maxsize=None)
def _bpe_merges() -> tuple[tuple[str, str], ...]:
    """The merge rules, in priority order, from open_clip's packaged BPE file."""
    data = (resources.files("open_clip") / BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # line 0 is a version header
    return tuple(tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES])


@functools.lru_cache(maxsize=None)
def sd1_tokenizer() -> CLIPTokenizer:
    """The SD 1.x tokenizer, built once per process."""
    merges = _bpe_merges()
    byte_symbols = list(bytes_to_unicode().values())
    symbols = (byte_symbols
               + [s + "</w>" for s in byte_symbols]
               + ["".join(pair) for pair in merges]
               + [BOS_TOKEN, EOS_TOKEN])
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges))
    if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (BOS_ID, EOS_ID):
        raise RuntimeError(f"open_clip's {BPE_FILE} does not give CLIP's special ids "
                           f"{BOS_ID}/{EOS_ID}; is the open_clip installation intact?")
    return tokenizer


def _check_args(texts: Sequence[str], max_length: int, caller: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{caller}: texts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{caller}: texts[{i}] must be a string, got {type(text).__name__}")
    chunk_count(max_length, caller)
    return list(texts)


def chunk_count(max_length: int, caller: str = "max_length") -> int:
    """1 for `max_length` <= 77 (one sequence of that many positions), k for a long prompt
    of `max_length` = 75 x k content tokens (k >= 2: 150, 225, ...)."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"{caller}: max_length must be an integer of at least 2 (BOS and EOS), got {max_length!r}")
    if max_length <= CONTEXT_LENGTH:
        return 1
    if max_length % CHUNK_TOKENS:
        raise ValueError(f"{caller}: max_length must be at most {CONTEXT_LENGTH} positions, or a multiple of "
                         f"{CHUNK_TOKENS} tokens for a long prompt (150, 225, ...), got {max_length}")
    return max_length // CHUNK_TOKENS


def split_into_chunks(ids: torch.LongTensor, chunks: int, pad_id: int) -> torch.LongTensor:
    """[B, 75 x chunks + 2] ids of one sequence (BOS, content, EOS, padding) -> [B, 77 x chunks]:
    each chunk BOS + its share of the content + EOS, then `pad_id` (see the module notes)."""
    out = torch.full((ids.shape[0], chunks, CONTEXT_LENGTH), pad_id, dtype=torch.long)
    out[:, :, 0] = BOS_ID
    for b, row in enumerate(ids.tolist()):
        content = row[1:row.index(EOS_ID, 1)]  # truncation keeps EOS last, so there is one
        for c in range(chunks):
            part = content[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
            out[b, c, 1:1 + len(part)] = torch.tensor(part, dtype=torch.long)
            out[b, c, 1 + len(part)] = EOS_ID
    return out.reshape(ids.shape[0], chunks * CONTEXT_LENGTH)


def tokenize_sd1(texts: list[str], max_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """SD 1.x ids. Up to 77: [B, max_length], BOS, at most max_length - 2 content ids, EOS,
    EOS padding. 150, 225, ...: [B, 77 x k], k chunks of 75 content tokens (module notes)."""
    texts = _check_args(texts, max_length, "tokenize_sd1")
    chunks = chunk_count(max_length)
    length = max_length if chunks == 1 else chunks * CHUNK_TOKENS + 2
    ids = sd1_tokenizer()(texts, padding="max_length", truncation=True, max_length=length,
                          return_tensors="pt")["input_ids"]
    return ids if chunks == 1 else split_into_chunks(ids, chunks, EOS_ID)


def tokenize_sd2(texts: list[str], max_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """SD 2.x ids. Up to 77: [B, max_length], exactly as `open_clip.tokenize` gives them
    (0 padding). 150, 225, ...: [B, 77 x k], k chunks padded with 0 after their EOS."""
    texts = _check_args(texts, max_length, "tokenize_sd2")
    chunks = chunk_count(max_length)
    if chunks == 1:
        return open_clip.tokenize(texts, context_length=max_length)
    return split_into_chunks(open_clip.tokenize(texts, context_length=chunks * CHUNK_TOKENS + 2), chunks, 0)


def token_count(text: str) -> int:
    """Number of SD 1.x content tokens in `text` (BOS/EOS not counted; SD 1.x keeps 75)."""
    if not isinstance(text, str):
        raise TypeError(f"token_count: text must be a string, got {type(text).__name__}")
    return len(sd1_tokenizer()(text, add_special_tokens=False)["input_ids"])
