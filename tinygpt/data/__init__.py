"""Host-side data: tokenizers (GPT-2 via tiktoken, characters, a byte-level BPE trainer),
next-token windows with a resumable batch loader, and the default training text. Plain NumPy;
from the rest of tinygpt it uses only tinygpt.files (atomic writes) and tinygpt.errors."""

from .bpe import BPETokenizer, train_bpe
from .char import CharTokenizer
from .corpus import default_corpus
from .dataset import DataLoader, GPTDataset, create_dataloader, encode_text, train_val_split
from .gpt2 import gpt2_tokenizer
from .saving import load_tokenizer, save_tokenizer, tokenizer_from_dict, tokenizer_to_dict

__all__ = [
    "gpt2_tokenizer",
    "CharTokenizer",
    "train_bpe",
    "BPETokenizer",
    "GPTDataset",
    "DataLoader",
    "create_dataloader",
    "train_val_split",
    "encode_text",
    "save_tokenizer",
    "load_tokenizer",
    "tokenizer_to_dict",
    "tokenizer_from_dict",
    "default_corpus",
]
