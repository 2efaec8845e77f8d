"""Tokenizers: a built-in byte-level tokenizer and any ``tokenizer.json`` via ``tokenizers``.

Both share one interface: ``encode(text, add_bos=False, add_eos=False) -> list[int]``,
``decode(ids, skip_special_tokens=False) -> str``, ``vocab_size``, ``bos_token_id``,
``eos_token_id``, ``pad_token_id``, ``token_to_id(token)``, ``special_token_ids`` and
``save(path)``. :func:`load_tokenizer` picks one from a path (or returns the byte tokenizer).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "DEFAULT_SPECIAL_TOKENS"]

# pad/bos/eos and the R1 chat template's reasoning/answer tags, each one id
DEFAULT_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>")
BYTE_TOKENIZER_FILE = "r1x_byte_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
_FORMAT = "r1x-byte-tokenizer"


class ByteTokenizer:
    """Byte-level tokenizer: ids ``0..255`` are the UTF-8 bytes, special tokens follow from 256.

    Special-token strings in the text encode to their single id (``parse_special=False``
    encodes them as plain bytes instead). Decoding replaces invalid UTF-8 with U+FFFD.
    """

    def __init__(self, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS):
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"duplicate special tokens in {special_tokens}")
        if any(not t for t in special_tokens):
            raise ValueError("special tokens must be non-empty strings")
        self.special_tokens = special_tokens
        self._special_to_id = {t: 256 + i for i, t in enumerate(special_tokens)}
        self._id_to_special = {i: t for t, i in self._special_to_id.items()}
        # longest first, so a special token that is a prefix of another never wins wrongly
        pattern = "|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if special_tokens else None

    # -- ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token, or of a one-byte string; ``None`` otherwise."""
        if token in self._special_to_id:
            return self._special_to_id[token]
        b = token.encode("utf-8")
        return b[0] if len(b) == 1 else None

    def id_to_token(self, i: int) -> str:
        if i in self._id_to_special:
            return self._id_to_special[i]
        if 0 <= i < 256:
            return bytes([i]).decode("latin-1")
        raise ValueError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")

    @property
    def special_token_ids(self) -> list[int]:
        return list(self._id_to_special)

    def _optional(self, token: str) -> int | None:
        return self._special_to_id.get(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._optional("<pad>")

    @property
    def bos_token_id(self) -> int | None:
        return self._optional("<bos>")

    @property
    def eos_token_id(self) -> int | None:
        return self._optional("<eos>")

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, parse_special: bool = True) -> list[int]:
        ids: list[int] = []
        if add_bos:
            ids.append(_required(self.bos_token_id, "<bos>"))
        if parse_special and self._special_re is not None:
            for n, part in enumerate(self._special_re.split(text)):
                if n % 2:  # the split keeps the separators at odd positions
                    ids.append(self._special_to_id[part])
                elif part:
                    ids.extend(part.encode("utf-8"))
        else:
            ids.extend(text.encode("utf-8"))
        if add_eos:
            ids.append(_required(self.eos_token_id, "<eos>"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._id_to_special:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            if not skip_special_tokens:
                out.append(self._id_to_special[i])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __call__(self, text: str, **kw) -> list[int]:
        return self.encode(text, **kw)

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write the tokenizer as JSON; a directory (or a path without ``.json``) gets
        ``r1x_byte_tokenizer.json`` inside it. Returns the file written."""
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, BYTE_TOKENIZER_FILE)
        with open(path, "w") as f:
            json.dump({"format": _FORMAT, "version": 1, "special_tokens": self.special_tokens}, f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ByteTokenizer":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, BYTE_TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"byte tokenizer file not found: '{path}'")
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"'{path}' is not an r1x byte tokenizer file (no \"format\": \"{_FORMAT}\")")
        return cls(data["special_tokens"])

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


def _required(i: int | None, name: str) -> int:
    if i is None:
        raise ValueError(f"this tokenizer has no {name} token")
    return i


# names tried (in order) when a tokenizer.json comes without a tokenizer_config.json saying which
# token is which
_BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|startoftext|>")
_EOS_CANDIDATES = ("<eos>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<｜▁pad▁｜>", "[PAD]", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` package, with :class:`ByteTokenizer`'s interface.

    bos/eos/pad come from the arguments, else from a ``tokenizer_config.json`` beside the file
    (``bos_token``/``eos_token``/``pad_token``), else from common token names.
    """

    def __init__(self, tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        self.tokenizer = tokenizer
        self.bos_token = self._pick(bos_token, _BOS_CANDIDATES)
        self.eos_token = self._pick(eos_token, _EOS_CANDIDATES)
        self.pad_token = self._pick(pad_token, _PAD_CANDIDATES)

    def _pick(self, given: str | None, candidates: Sequence[str]) -> str | None:
        if given is not None:
            if self.tokenizer.token_to_id(given) is None:
                raise ValueError(f"token {given!r} is not in the tokenizer's vocabulary")
            return given
        return next((t for t in candidates if self.tokenizer.token_to_id(t) is not None), None)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw) -> "HFTokenizer":
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("loading a tokenizer.json needs the `tokenizers` package (pip install tokenizers)") from e
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, HF_TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: '{path}'")
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            for name in ("bos_token", "eos_token", "pad_token"):
                val = cfg.get(name)
                if isinstance(val, dict):
                    val = val.get("content")
                if isinstance(val, str) and name not in kw:
                    kw[name] = val
        return cls(Tokenizer.from_file(path), **kw)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    @property
    def special_token_ids(self) -> list[int]:
        return sorted(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.tokenizer.token_to_id(self.pad_token)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # added/special tokens in the text are matched by `tokenizers` itself; the post-processor's
        # own bos/eos are off so add_bos/add_eos alone decide
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if add_bos:
            ids.insert(0, _required(self.bos_token_id, "bos"))
        if add_eos:
            ids.append(_required(self.eos_token_id, "eos"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str, **kw) -> list[int]:
        return self.encode(text, **kw)

    def save(self, path: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` (into ``path`` if it is a directory or has no ``.json``)."""
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, HF_TOKENIZER_FILE)
        self.tokenizer.save(path)
        return path

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})"


def load_tokenizer(path: str | os.PathLike | None = None) -> ByteTokenizer | HFTokenizer:
    """``None`` (or ``"byte"``): the built-in :class:`ByteTokenizer`. A ``tokenizer.json`` file, or a
    directory holding one: :class:`HFTokenizer`. A saved byte tokenizer (file or directory): it."""
    if path is None or (isinstance(path, str) and path == "byte"):
        return ByteTokenizer()
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, HF_TOKENIZER_FILE)):
            return HFTokenizer.from_file(os.path.join(path, HF_TOKENIZER_FILE))
        if os.path.isfile(os.path.join(path, BYTE_TOKENIZER_FILE)):
            return ByteTokenizer.load(path)
        raise FileNotFoundError(f"no tokenizer in '{path}': expected '{HF_TOKENIZER_FILE}' or '{BYTE_TOKENIZER_FILE}'")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: '{path}' does not exist")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{path}' is not a JSON tokenizer file: {e}") from None
    if isinstance(data, dict) and data.get("format") == _FORMAT:
        return ByteTokenizer.load(path)
    return HFTokenizer.from_file(path)
