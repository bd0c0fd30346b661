"""SmolLM2's byte-level BPE tokenizer, rebuilt as a fast ``tiktoken.Encoding`` from the GGUF vocabulary.

Why this works: in this vocabulary a token's id is also its BPE merge priority (merge results
appear in increasing id order), so ``mergeable_ranks = {token bytes: id}`` is exactly what
tiktoken needs. Token strings in the GGUF use GPT-2's byte-to-unicode alphabet; we map them back
to raw bytes. Special tokens (ids 0-16, e.g. <|im_start|>) go to ``special_tokens``.

Pre-tokenizer ("smollm" in llama.cpp, Digits(individual) + ByteLevel in HF tokenizers): every
digit is split off on its own first, then GPT-2's regex runs on the pieces between digits. We
express the same thing as one regex: digits are single tokens without a leading space, and a run
of whitespace directly before a digit stays whole (the ``\\s+(?=\\p{N})`` branch), because in the
two-step version that run ends its piece. tests/test_tokenizer.py checks ids against the
``tokenizers`` reference on many strings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import tiktoken

from common.outputs import cache_dir

PAT_STR = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
)
# Qwen2's pre-tokenizer ("qwen2" in llama.cpp): the GPT-4 (cl100k) regex with single digits. Letters may
# take one leading non-letter (e.g. "(Hello" -> "(Hello"), punctuation runs keep their newlines, and
# contractions match in any case.
QWEN2_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PRE_TOKENIZERS = {"smollm": PAT_STR, "qwen2": QWEN2_PAT_STR}
# the system message each model's own chat template inserts when a conversation has none
DEFAULT_SYSTEMS = {
    "smollm": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "qwen2": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_gguf_vocab(gguf_path: Path) -> dict:
    """Read tokens, token types and special ids from the GGUF (cached as JSON: reading the GGUF takes ~2 s)."""
    gguf_path = Path(gguf_path)
    st = gguf_path.stat()
    cached = cache_dir("derived") / f"{gguf_path.stem}-{st.st_size}-vocab.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    import gguf  # local import: only needed the first time

    reader = gguf.GGUFReader(str(gguf_path))
    f = reader.fields
    vocab = {
        "tokens": list(f["tokenizer.ggml.tokens"].contents()),
        "token_type": [int(t) for t in f["tokenizer.ggml.token_type"].contents()],
        "eos_token_id": int(f["tokenizer.ggml.eos_token_id"].contents()),
        "bos_token_id": int(f["tokenizer.ggml.bos_token_id"].contents()),
        "pre": str(f["tokenizer.ggml.pre"].contents()) if "tokenizer.ggml.pre" in f else "smollm",
    }
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, cached)
    return vocab


class StreamDecoder:
    """Turn a stream of token ids into text pieces without ever splitting a UTF-8 character.

    A Chinese character or an emoji is often 2-4 byte-level tokens; we hold bytes back until
    they form complete characters.
    """

    def __init__(self, tokenizer: "ChatTokenizer"):
        self.tok = tokenizer
        self.buf = b""

    def feed(self, token_id: int) -> str:
        self.buf += self.tok.token_bytes(token_id)
        # find the longest prefix that is valid UTF-8
        for cut in range(len(self.buf), max(len(self.buf) - 4, -1), -1):
            try:
                text = self.buf[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buf = self.buf[cut:]
            return text
        # more than 4 undecodable bytes: give up on them (the model produced invalid UTF-8)
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""
        return text

    def flush(self) -> str:
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""
        return text


class ChatTokenizer:
    """tiktoken encoding + the model's ChatML template (SmolLM2 and Qwen2 both use ChatML)."""

    def __init__(self, vocab: dict, name: str = "smollm2"):
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        special: dict[str, int] = {}
        pre = vocab.get("pre", "smollm")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported pre-tokenizer {pre!r}")
        for i, (tok, ttype) in enumerate(zip(vocab["tokens"], vocab["token_type"])):
            if ttype in (3, 4):  # control / user-defined special token (e.g. <|im_start|>, <tool_call>)
                special[tok] = i
            elif ttype == 5:     # unused placeholder ([PAD151665] in Qwen2): never produced by encoding
                continue
            else:
                ranks[bytes(byte_decoder[ch] for ch in tok)] = i
        self.enc = tiktoken.Encoding(name=name, pat_str=PRE_TOKENIZERS[pre], mergeable_ranks=ranks,
                                     special_tokens=special)
        self.default_system = DEFAULT_SYSTEMS[pre]
        self.special_tokens = special
        self.n_vocab = len(vocab["tokens"])
        self._id_to_bytes = {i: b for b, i in ranks.items()}
        for s, i in special.items():
            self._id_to_bytes[i] = s.encode("utf-8")
        for i, (tok, ttype) in enumerate(zip(vocab["tokens"], vocab["token_type"])):
            if ttype == 5:
                self._id_to_bytes[i] = b""
        self.im_start = special["<|im_start|>"]
        self.im_end = special["<|im_end|>"]
        self.eos_ids = {self.im_end, special.get("<|endoftext|>", 0), vocab["eos_token_id"]}

    # --- plain text ---
    def encode(self, text: str) -> list[int]:
        """Encode plain text (special-token strings are treated as ordinary text)."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[int(token_id)]

    def piece(self, token_id: int) -> str:
        """A printable form of one token: its text, or <0xE4> style for a lone byte fragment."""
        b = self.token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{x:02X}>" for x in b)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # --- chat ---
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            default_system: bool = True) -> list[int]:
        """ChatML, as in the model's own template (which adds a default system message)."""
        ids: list[int] = []
        if default_system and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        nl = self.encode("\n")
        for m in messages:
            ids += [self.im_start] + self.encode(f"{m['role']}\n{m['content']}") + [self.im_end] + nl
        if add_generation_prompt:
            ids += [self.im_start] + self.encode("assistant\n")
        return ids


_CACHE: dict[str, ChatTokenizer] = {}


def load_tokenizer(gguf_path: str | os.PathLike | None = None) -> ChatTokenizer:
    """Load (once per process) the tokenizer of the local model."""
    from common.model_files import find_model_file

    path = find_model_file(gguf_path)
    key = str(path)
    if key not in _CACHE:
        _CACHE[key] = ChatTokenizer(read_gguf_vocab(path))
    return _CACHE[key]
