"""A Hugging Face folder's tokenizer: tokenizer.json read by the `tokenizers` library, and the
chat template (chat_template.jinja, or "chat_template" in tokenizer_config.json) rendered
with Jinja as transformers renders it. Both libraries are the extra `pip install -e ".[hf]"`.

The object has the interface tinygpt's other tokenizers have (encode, decode, n_vocab,
eot_token), so generate, chat and finetuning use it unchanged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

INSTALL = 'pip install -e ".[hf]" (or: pip install tokenizers jinja2)'


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """tokenizer.json's tokenizer; `config` is tokenizer_config.json's content."""

    def __init__(self, tokenizer, config: dict, chat_template: str | None, name: str):
        self.tokenizer, self.config, self.chat_template, self.name = tokenizer, config, chat_template, name
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self.eot_token = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)

    def to_dict(self) -> dict:
        """Everything needed to rebuild it (a checkpoint's tokenizer.json under "type": "hf")."""
        return {"tokenizer": self.tokenizer.to_str(), "config": self.config, "chat_template": self.chat_template,
                "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "HFTokenizer":
        return cls(_tokenizers().Tokenizer.from_str(d["tokenizer"]), d["config"], d["chat_template"], d["name"])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as transformers' tokenizer(text).input_ids gives them (its post-processor adds
        what the model expects, such as Llama 3's <|begin_of_text|>)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation [{"role": ..., "content": ...}, ...], rendered by the
        folder's template in the sandboxed Jinja environment transformers uses."""
        if not self.chat_template:
            raise ValueError(f"{self.name} has no chat template (no chat_template.jinja and no chat_template "
                             "in tokenizer_config.json): it is not an instruct model's folder")
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError(f"chat templates need jinja2: {INSTALL}") from None

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent, **kw)
        env.globals["raise_exception"] = raise_exception
        specials = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          **specials)


def _tokenizers(what="a Hugging Face tokenizer"):
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"reading {what} needs the tokenizers library: {INSTALL}") from None
    return tokenizers


def load_hf_tokenizer(folder: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder holding tokenizer.json."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (tinygpt reads Hugging Face fast tokenizers only; "
                                "a folder with only tokenizer.model or vocab.json is not supported)")
    try:
        tokenizer = _tokenizers(path).Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for files it cannot parse
        raise ValueError(f"{path} is not a tokenizer this version of tokenizers reads ({str(e).splitlines()[0]})") from None
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    template_path = folder / "chat_template.jinja"
    template = template_path.read_text() if template_path.exists() else config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one, as transformers picks
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return HFTokenizer(tokenizer, config, template, str(folder))
