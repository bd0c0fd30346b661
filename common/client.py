"""One client for every lesson: an OpenAI-compatible API (official ``openai`` SDK) or the local model.

    client = LLMClient()                       # backend="auto"
    for piece in client.chat_stream("Hello"):  # text arrives piece by piece
        print(piece, end="", flush=True)
    vectors = client.embed(["a", "b"])         # [2, D], L2-normalised

Backends
  openai  OPENAI_API_KEY / OPENAI_BASE_URL / OPENAI_MODEL (or --model, --base-url). Works with
          OpenAI and OpenAI-compatible servers: Ollama (http://localhost:11434/v1), vLLM,
          llama.cpp server, DeepSeek (https://api.deepseek.com), Qwen/DashScope
          (https://dashscope.aliyuncs.com/compatible-mode/v1).
  local   SmolLM2-135M-Instruct on this machine (English only), embeddings by all-MiniLM-L6-v2.
  auto    openai when a key or base URL is configured and the server answers, else local;
          prints one line saying which and why. API errors in auto mode fall back to local.

A ``.env`` file in the current directory or the project root is read (it never overrides
variables already set). The API key is never printed.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from common.errors import UserError
from common.outputs import REPO_ROOT

BACKENDS = ("auto", "openai", "local")
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
DEFAULT_OPENAI_EMBED_MODEL = "text-embedding-3-small"


class LLMError(UserError):
    """An API problem explained in one Chinese line (never containing the key)."""


def load_env_file() -> Path | None:
    """Read .env from the current directory or the project root, without overriding real env vars."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # python-dotenv is in requirements.txt; without it .env is simply ignored
        return None
    for d in (Path.cwd(), REPO_ROOT):
        f = d / ".env"
        if f.is_file():
            load_dotenv(f, override=False)
            return f
    return None


def _redact(text: str, key: str | None) -> str:
    if key:
        text = text.replace(key, "***")
    return re.sub(r"sk-[A-Za-z0-9_\-*]{4,}", "sk-***", text)


def explain_api_error(e: Exception, base_url: str, model: str, key: str | None) -> LLMError:
    """Map an openai SDK exception to a one-line Chinese message."""
    import openai

    where = base_url or "https://api.openai.com/v1"
    fixed = (  # first match wins: APITimeoutError is a kind of APIConnectionError
        (openai.AuthenticationError, f"API key 无效或未被 {where} 接受（401）：请检查 OPENAI_API_KEY 是否正确、是否属于这个服务商。"),
        (openai.PermissionDeniedError, f"没有权限（403）：这个 key 不能使用模型 {model}，或所在地区不受支持。"),
        (openai.NotFoundError, f"找不到（404）：服务器上没有模型 {model!r} 或地址不对；用 --model 指定正确的模型名，"
                               "检查 OPENAI_BASE_URL（通常以 /v1 结尾）。"),
        (openai.RateLimitError, "请求被限流或额度不足（429 rate limit）：请稍等再试，或检查账户余额/配额。"),
        (openai.APITimeoutError, f"请求超时：{where} 没有及时回应。检查网络/代理，或改用 --backend local。"),
        (openai.APIConnectionError, f"连不上 {where}：检查网络、代理和 OPENAI_BASE_URL，本地服务（如 Ollama）是否已启动；"
                                    "或改用 --backend local。"),
    )
    msg = next((text for cls, text in fixed if isinstance(e, cls)), None)
    if msg is None and isinstance(e, openai.APIStatusError):  # other HTTP errors: show the server's words
        detail = re.sub(r"^Error code: \d+ - ", "", str(getattr(e, "message", e)))
        what = "请求被服务器拒绝（400）" if isinstance(e, openai.BadRequestError) else f"服务器返回错误 {e.status_code}"
        msg = f"{what}：{_redact(detail, key)[:160]}"
    elif msg is None:
        msg = f"与 API 通信时出错（{type(e).__name__}）：连接可能中途断开，请重试或改用 --backend local。"
    return LLMError(_redact(msg, key))


class LLMClient:
    def __init__(self, backend: str | None = None, model: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, verbose: bool = True, local_dtype: str | None = None,
                 timeout: float = 60.0, max_retries: int = 1, local_model: str | None = None,
                 model_file: str | None = None, device: str | None = None):
        load_env_file()
        backend = (backend or os.environ.get("LLM_BACKEND") or "auto").lower()
        if backend not in BACKENDS:
            raise UserError(f"未知后端 {backend!r}：可选 auto / openai / local。")
        self.verbose = verbose
        self.requested = backend
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/") or None
        self._model_arg = model or os.environ.get("OPENAI_MODEL") or None
        self._embed_arg = os.environ.get("OPENAI_EMBEDDING_MODEL") or None
        self.embed_model = self._embed_arg or DEFAULT_OPENAI_EMBED_MODEL
        self.local_dtype = local_dtype
        from common.model_files import LOCAL_MODELS, resolve_local_model
        self.local_key = resolve_local_model(local_model)
        self.local_info = LOCAL_MODELS[self.local_key]
        self.model_file = model_file
        self.device = device
        self.timeout, self.max_retries = timeout, max_retries
        self._oa = None
        self._local = None
        self._embedder = None
        self.connected = False          # the API answered (or, with --backend openai, was configured)
        self.embed_local = False        # set when only the API's embeddings failed (chat may still use the API)
        self.model_name = ""

        configured = bool(self.api_key or self.base_url)
        if backend == "local":
            self._use_local("按要求使用本地模型（--backend local）")
        elif backend == "openai":
            if not configured:
                raise UserError("--backend openai 需要 API：请设置 OPENAI_API_KEY（或 OPENAI_BASE_URL 指向本地服务，如 Ollama），或改用 --backend local。")
            self._connect(probe=False)
            self.backend, self.reason = "openai", f"按要求使用 API（{self._where()}，模型 {self.model_name}）"
        else:  # auto
            if not configured:
                self._use_local("没有设置 OPENAI_API_KEY / OPENAI_BASE_URL，使用离线本地模型")
            else:
                try:
                    self._connect(probe=True)
                    self.backend = "openai"
                    self.reason = f"检测到 API 配置且服务器有回应（{self._where()}，模型 {self.model_name}）"
                except LLMError as e:
                    self._use_local(f"API 不可用，改用本地模型。原因：{e}")
        if verbose:
            print(f"[后端] {self.backend}：{self.reason}", flush=True)

    # ---------- setup ----------
    def _where(self) -> str:
        return self.base_url or "api.openai.com"

    def _use_local(self, reason: str) -> None:
        self.backend, self.reason = "local", reason
        from common.model_files import LOCAL_MODELS, explicit_model_file, model_of_file
        explicit = explicit_model_file(self.model_file, self.local_key)
        if explicit is not None:   # the file the user pointed at decides which model runs (its own metadata)
            self.local_key = model_of_file(explicit, self.local_key, quiet=not self.verbose)
            self.local_info = LOCAL_MODELS[self.local_key]
        self.model_name = f"{self.local_info.name} (local)"

    def _connect(self, probe: bool) -> None:
        try:
            import openai
        except ImportError:
            raise UserError("没有安装 openai 包：请运行 pip install -r requirements.txt") from None
        self._oa = openai.OpenAI(api_key=self.api_key or "not-needed", base_url=self.base_url,
                                 timeout=self.timeout, max_retries=self.max_retries)
        listed: list[str] = []
        custom = bool(self.base_url and "api.openai.com" not in self.base_url)
        if probe or (custom and not self._model_arg):
            try:
                listed = [m.id for m in self._oa.with_options(timeout=8.0, max_retries=0).models.list()]
            except openai.NotFoundError:
                listed = []  # the server answered; it just has no /models endpoint
            except Exception as e:  # noqa: BLE001 - every failure becomes one clear line
                raise explain_api_error(e, self.base_url, self._model_arg or "", self.api_key) from None
        if self._model_arg:
            self.model_name = self._model_arg
        elif custom and listed:
            chat_models = [m for m in listed if "embed" not in m.lower()]
            self.model_name = (chat_models or listed)[0]
        elif custom:
            raise UserError(f"{self.base_url} 没有列出可用模型：请用 --model 或 OPENAI_MODEL 指定模型名。")
        else:
            self.model_name = DEFAULT_OPENAI_MODEL
        listed_embedders = [m for m in listed if "embedding" in m.lower()]
        if custom and listed_embedders and not self._embed_arg:   # e.g. lesson 06's server lists its MiniLM
            self.embed_model = listed_embedders[0]
        self.connected = True

    @property
    def openai(self):
        """The official SDK's ``openai.OpenAI`` object when the backend is an API, else None: for API
        features that chat()/embed() do not wrap, e.g. response_format and tools (lesson 07)."""
        return self._oa if self.backend == "openai" else None

    def local(self):
        """The LocalModel (loaded on first use)."""
        if self._local is None:
            from common.local_model import load_local_model
            dtype = self.local_dtype or os.environ.get("LLM_COURSE_DTYPE") or "fp32"
            from common.device import get_device
            self._local = load_local_model(self.model_file, dtype=dtype, device=get_device(self.device or "auto"),
                                           verbose=self.verbose, model=self.local_key)
        return self._local

    def _fallback(self, err: LLMError) -> None:
        print(f"\n[后端] API 调用失败，自动改用本地模型。原因：{err}", file=sys.stderr, flush=True)
        self._use_local(f"API 调用失败后回退到本地模型（{err}）")

    # ---------- chat ----------
    @staticmethod
    def _messages(messages, system: str | None = None) -> list[dict]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system}] + messages
        return messages

    def chat_stream(self, messages, temperature: float = 0.7, top_p: float = 1.0, max_tokens: int = 256,
                    seed: int | None = None, top_k: int = 0, system: str | None = None) -> Iterator[str]:
        """Yield the reply as text pieces, as they are generated. (top_k: local backend only.)"""
        messages = self._messages(messages, system)
        if self.backend == "openai":
            started = False
            try:
                for piece in self._openai_stream(messages, temperature, top_p, max_tokens, seed):
                    started = True
                    yield piece
                return
            except LLMError as e:
                if self.requested != "auto" or started:
                    raise
                self._fallback(e)
        yield from self._local_stream(messages, temperature, top_p, max_tokens, seed, top_k)

    def chat(self, messages, **kw) -> str:
        return "".join(self.chat_stream(messages, **kw))

    def _openai_stream(self, messages, temperature, top_p, max_tokens, seed) -> Iterator[str]:
        kwargs = dict(model=self.model_name, messages=messages, temperature=temperature, top_p=top_p,
                      max_tokens=max_tokens, stream=True)
        if seed is not None:
            kwargs["seed"] = seed
        import openai

        received = False
        try:
            stream = self._oa.chat.completions.create(**kwargs)
            for chunk in stream:
                received = True
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except Exception as e:  # noqa: BLE001 - SDK errors and dropped connections alike
            if received and not isinstance(e, (openai.APIStatusError, openai.APITimeoutError)):
                raise LLMError("连接在回复中途断开（已收到部分内容）：请重试，或改用 --backend local。") from None
            raise explain_api_error(e, self.base_url, self.model_name, self.api_key) from None

    def _local_stream(self, messages, temperature, top_p, max_tokens, seed, top_k) -> Iterator[str]:
        lm = self.local()
        ids = lm.tokenizer.apply_chat_template(messages)
        dec = lm.tokenizer.stream_decoder()
        for tid in lm.generate(ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed):
            text = dec.feed(tid)
            if text:
                yield text
        tail = dec.flush()
        if tail:
            yield tail

    # ---------- embeddings ----------
    @property
    def embed_name(self) -> str:
        """Which embedding model embed() uses now (use it as part of any cache key)."""
        return f"openai:{self.embed_model}" if self._embed_via_api else "local:all-MiniLM-L6-v2"

    @property
    def _embed_via_api(self) -> bool:
        # Each capability falls back on its own: a server without /v1/embeddings keeps serving chat, and
        # a chat failure does not move the embeddings (and every cached vector) to another model.
        return self.connected and not self.embed_local

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings [N, D] float32, each row L2-normalised."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self._embed_via_api:
            out, err = [], None
            try:
                for i in range(0, len(texts), batch_size):
                    resp = self._oa.embeddings.create(model=self.embed_model, input=texts[i:i + batch_size])
                    out += [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
            except Exception as e:  # noqa: BLE001
                err = explain_api_error(e, self.base_url, self.embed_model, self.api_key)
            if err is None:
                vecs = np.asarray(out, dtype=np.float32).reshape(len(texts), -1)
                return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            if self.requested != "auto":
                raise err
            self.embed_local = True
            print(f"\n[后端] API 的嵌入接口不可用，只有向量改用本地 all-MiniLM-L6-v2（生成不受影响）。原因：{err}",
                  file=sys.stderr, flush=True)
        if self._embedder is None:
            from common.embeddings import load_local_embedder
            self._embedder = load_local_embedder()
        return self._embedder.embed(list(texts))


def client_from_args(args, verbose: bool = True) -> LLMClient:
    return LLMClient(backend=args.backend, model=args.model, base_url=args.base_url, verbose=verbose,
                     local_dtype=getattr(args, "dtype", None), local_model=getattr(args, "local_model", None),
                     model_file=getattr(args, "model_file", None), device=getattr(args, "device", None))
