"""SmolLM2 的字节级 BPE 分词器：用 GGUF 里的词表重建成一个很快的 ``tiktoken.Encoding``。

为什么行得通：这份词表里，token 的 id 同时就是它的 BPE 合并优先级（合并出来的 token 按 id 从小到大
出现），所以 ``mergeable_ranks = {token 的字节: id}`` 正好就是 tiktoken 要的东西。GGUF 里的 token
字符串用的是 GPT-2 的"字节 -> unicode 字符"对照表，我们把它们还原成原始字节。特殊 token（id 0-16，
比如 <|im_start|>）放进 ``special_tokens``。

预分词（pre-tokenizer）：BPE 合并之前，先用正则把文本切成小段，合并只在每一段内部进行。
SmolLM2 的预分词（llama.cpp 里叫 "smollm"，HF tokenizers 里是 Digits(individual) + ByteLevel）：
先把每个数字单独切出来，再在数字之间的片段上跑 GPT-2 的正则。我们用一条正则做到同样的效果：
数字都是单独的 token，前面不带空格；紧挨在数字前面的一串空白保持完整（``\\s+(?=\\p{N})``
这个分支），因为在两步的做法里，这串空白正好是前一段的结尾。tests/test_tokenizer.py 在
很多字符串上拿 ``tokenizers`` 的参考实现逐个比对 id。
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
# Qwen2 的预分词（llama.cpp 里叫 "qwen2"）：GPT-4（cl100k）的正则，数字也是一个一个单独切。字母前面
# 可以带一个非字母字符（比如 "(Hello" -> "(Hello"），一串标点会连同后面的换行一起切，
# 英文缩写（'s、'll 等）不分大小写。
QWEN2_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PRE_TOKENIZERS = {"smollm": PAT_STR, "qwen2": QWEN2_PAT_STR}
# 对话里没有 system 消息时，各模型自带的对话模板会自动插入的那条 system 消息
DEFAULT_SYSTEMS = {
    "smollm": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "qwen2": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 的可逆映射：把 256 个字节各对应到一个可打印的 unicode 字符。"""
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
    """从 GGUF 读出 token 列表、token 类型和特殊 token 的 id（缓存成 JSON：每次读 GGUF 要 2 秒左右）。"""
    gguf_path = Path(gguf_path)
    st = gguf_path.stat()
    cached = cache_dir("derived") / f"{gguf_path.stem}-{st.st_size}-vocab.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    import gguf  # 在这里才导入：只有第一次读 GGUF 时才用得到

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
    """把一个接一个到来的 token id 变成一段段文字，保证不会把一个 UTF-8 字符从中间切开。

    一个汉字或 emoji 常常由 2-4 个字节级 token 组成；字节还凑不成完整的字符时先留着，
    等凑齐了再输出。
    """

    def __init__(self, tokenizer: "ChatTokenizer"):
        self.tok = tokenizer
        self.buf = b""

    def feed(self, token_id: int) -> str:
        self.buf += self.tok.token_bytes(token_id)
        # 找出能按 UTF-8 正确解码的最长前缀
        for cut in range(len(self.buf), max(len(self.buf) - 4, -1), -1):
            try:
                text = self.buf[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buf = self.buf[cut:]
            return text
        # 攒了 4 个以上字节还解不出来：说明模型生成了不合法的 UTF-8，放弃这些字节
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""
        return text

    def flush(self) -> str:
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""
        return text


class ChatTokenizer:
    """tiktoken 编码 + 模型的 ChatML 对话模板（SmolLM2 和 Qwen2 用的都是 ChatML）。"""

    def __init__(self, vocab: dict, name: str = "smollm2"):
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        special: dict[str, int] = {}
        pre = vocab.get("pre", "smollm")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported pre-tokenizer {pre!r}")
        for i, (tok, ttype) in enumerate(zip(vocab["tokens"], vocab["token_type"])):
            if ttype in (3, 4):  # 控制符 / 用户定义的特殊 token（比如 <|im_start|>、<tool_call>）
                special[tok] = i
            elif ttype == 5:     # 没用上的占位符（Qwen2 里的 [PAD151665]）：编码时永远不会产生
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

    # --- 普通文本 ---
    def encode(self, text: str) -> list[int]:
        """编码普通文本（文本里就算出现特殊 token 的字符串，也当普通文字处理）。"""
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[int(token_id)]

    def piece(self, token_id: int) -> str:
        """一个 token 的可打印形式：通常就是它的文字；如果只是半个字符的字节片段，就写成 <0xE4> 这样。"""
        b = self.token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{x:02X}>" for x in b)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # --- 对话 ---
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            default_system: bool = True) -> list[int]:
        """按 ChatML 格式把对话拼成 token（和模型自带的模板一致：没有 system 消息时补上默认的那条）。"""
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
    """加载本地模型的分词器（每个进程只加载一次）。"""
    from common.model_files import find_model_file

    path = find_model_file(gguf_path)
    key = str(path)
    if key not in _CACHE:
        _CACHE[key] = ChatTokenizer(read_gguf_vocab(path))
    return _CACHE[key]
