"""GPT-2's byte-pair encoding, through tiktoken.

GPT-2 has 50,257 token ids: 50,256 byte-level BPE tokens plus the special `<|endoftext|>` = 50256.
`tiktoken.get_encoding("gpt2")` downloads the ranks on first use, which fails offline, so a local
ranks file (the `gpt2.tiktoken` format: one `base64(token) rank` per line) can be given instead,
either as an argument or through the `TINYGPT_BPE_FILE` environment variable. A local file is
checked by sha256 so that a truncated or wrong file is refused instead of silently giving other ids.
"""

from __future__ import annotations

import hashlib
import os

import tiktoken
import tiktoken.load

from tinygpt.errors import RunError

ENDOFTEXT = "<|endoftext|>"
GPT2_N_VOCAB = 50257
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
BPE_FILE_ENV = "TINYGPT_BPE_FILE"

# GPT-2's pre-tokeniser, as tiktoken writes it (`r50k_pat_str` in tiktoken_ext/openai_public.py):
# contractions, optional-space + letters, optional-space + digits, optional-space + other symbols,
# then whitespace. Possessive quantifiers (`++`) make it equivalent to OpenAI's original but faster.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def gpt2_tokenizer(bpe_file: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """Return GPT-2's tokenizer as a `tiktoken.Encoding` (50,257 ids, `<|endoftext|>` = 50256).

    Sources, in order: `bpe_file`, else the `TINYGPT_BPE_FILE` environment variable, else
    `tiktoken.get_encoding("gpt2")` (downloads once, then uses tiktoken's cache).
    """
    if bpe_file is not None:
        return load_gpt2_bpe(bpe_file)
    env_file = os.environ.get(BPE_FILE_ENV)
    if env_file:
        return load_gpt2_bpe(env_file, source=f"${BPE_FILE_ENV}")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # network, proxy, cache or hash errors all mean "no ranks"
        raise RunError(
            f"could not get GPT-2's BPE ranks through tiktoken ({type(exc).__name__}: {exc}). "
            f"To work offline, pass --bpe-file PATH or set {BPE_FILE_ENV}=PATH, where PATH is a "
            f"local gpt2.tiktoken file (sha256 {GPT2_SHA256})."
        ) from exc


def load_gpt2_bpe(path: str | os.PathLike, source: str = "bpe_file") -> tiktoken.Encoding:
    """Build GPT-2's Encoding from a local ranks file after checking its sha256.

    Raises ValueError naming the path, the expected and the actual hash when the file is not
    GPT-2's. `source` only says in messages where the path came from.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual != GPT2_SHA256:
        raise ValueError(
            f"{path} (from {source}) is not GPT-2's BPE ranks file: "
            f"sha256 expected {GPT2_SHA256}, actual {actual}"
        )
    # Passing the hash again makes tiktoken re-check any copy it had cached under this path.
    ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=GPT2_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_N_VOCAB - 1},
        explicit_n_vocab=GPT2_N_VOCAB,
    )
