"""第 6 课：像生产环境一样部署模型——OpenAI 兼容 API、认证、限流、监控，以及实测"连续批处理"。

你将学到：
  1. 引擎（本课的核心）：一个调度线程独占模型；新请求在"下一步"就加入正在运行的批次
     （continuous batching），每一步只做一次批量前向：新来者的提示词预填充 + 其他序列各解码一个
     token；每个序列在 KV 缓存里有自己的一行（slot），结束的序列立刻退出、把位置让出来。
  2. 服务器：FastAPI + uvicorn（vLLM / SGLang 的 OpenAI 服务器也用它们），OpenAI 兼容的
     /v1/models、/v1/chat/completions（SSE 流式 / 非流式），/healthz、/readyz、/metrics
     （Prometheus），/v1/generate 与 SQLite 会话，API key / OAuth2 + JWT 认证，限流（429）。
  3. 压测：1、2、4、8、16 个并发流式客户端，对比"一次只服务一个请求"和连续批处理的
     总吞吐、首 token 延迟（TTFT）p50/p95、每 token 延迟 p50/p95——并用实测数字解释
     为什么批处理在"读内存受限"的解码阶段能成倍提高吞吐，又付出了什么延迟代价。

用时：约 15 分钟阅读；--demo --quick 不到 1 分钟；--demo 完整压测约 3～5 分钟（2 核 CPU，空闲时）。
不需要 API key。本地模型只懂英文，所以提示词用英文。
示例：
  python 06_serve.py                                  # 启动服务器：http://127.0.0.1:8000/v1
  LLM_API_KEYS=my-secret python 06_serve.py --port 8001
  python 01_hello_llm.py --base-url http://127.0.0.1:8000/v1
  python 06_serve.py --demo --quick                   # 本课演示：服务器和客户端在同一个进程里
  python 06_serve.py --demo --clients 1,2,4,8,16 --load-tokens 32
  更长的压测：python benchmarks/serve_load.py
"""
from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from common.errors import UserError, run_cli
from common.sampling import sample_next_token

NAME = "06_serve"
MODEL_IDS = {"smollm2": "smollm2-135m-instruct", "qwen0.5b": "qwen2.5-coder-0.5b-instruct"}  # /v1/models 里的名字
SESSION_ID = r"^[A-Za-z0-9_-]{1,64}$"


# ================================================================ 第 1 部分：连续批处理引擎
class QueueFull(Exception):
    """等待队列满了：服务器应回 503，让客户端稍后重试。"""


@dataclass
class Job:
    """一个生成请求：输入是 token id，输出通过 on_event(kind, value) 一个一个送回去。"""
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    on_event: Callable[[str, object], None] = lambda kind, value: None   # ("token", id) / ("done", 原因)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    slot: int = -1                 # 占用 KV 缓存的哪一行
    fed: int = 0                   # 提示词已经喂进模型多少个 token（长提示词分块预填充）
    generated: list = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_last: float = 0.0
    gen: torch.Generator | None = None


class Engine:
    """一个线程独占模型，循环执行 step()：每步一次批量前向，服务所有正在运行的序列。

    max_batch 行的 KV 缓存一次分配好；limit 是实际允许同时运行的序列数（1 = 一次只服务一个请求，
    用同一份代码做对比）。"""

    def __init__(self, model, max_batch: int = 16, max_len: int = 1024, prefill_chunk: int = 64,
                 max_queue: int = 64, metrics=None):
        self.model, self.max_len, self.chunk, self.max_queue = model, max_len, prefill_chunk, max_queue
        # 每行多留 prefill_chunk 列：同一步里别人的提示词更长时，本行后面会补 padding
        self.cache = model.new_cache(max_batch, max_len + prefill_chunk)
        self.cache.reset_rows(list(range(max_batch)))       # 每行各自记录长度（"ragged" 缓存）
        self.slots: list[Job | None] = [None] * max_batch
        self.limit = max_batch
        self.waiting: collections.deque[Job] = collections.deque()
        self.cv = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.metrics = metrics
        self.step_stats: dict[int, list] = collections.defaultdict(lambda: [0, 0.0])  # 批大小 -> [步数, 秒]
        self.prefill_stats = [0, 0.0]              # 含预填充的步：[步数, 秒]
        self.prefix: tuple | None = None           # 前缀缓存：(token ids, 每层的 K, 每层的 V)
        self.prefix_hits = 0                       # 有多少个提示词 token 靠前缀缓存省掉了预填充

    @torch.inference_mode()
    def set_prefix(self, ids: list[int]) -> None:
        """前缀缓存（vLLM 的 prefix caching / SGLang 的 RadixAttention 的最简版）：所有请求共有的开头
        （聊天模板里的默认系统提示词）只算一次 K/V；新请求以它开头时直接复制过去，不再重复预填充。"""
        cache = self.model.new_cache(1, len(ids))
        self.model(torch.tensor([ids], device=self.model.device), cache=cache)
        self.prefix = (list(ids), [k[0, :, :len(ids)].clone() for k in cache.k],
                       [v[0, :, :len(ids)].clone() for v in cache.v])

    def _reuse_prefix(self, job: Job, slot: int) -> None:
        ids, ks, vs = self.prefix or ([], [], [])
        P = len(ids)
        if not P or len(job.prompt) <= P or job.prompt[:P] != ids:
            return
        for layer, (k, v) in enumerate(zip(ks, vs)):
            self.cache.k[layer][slot, :, :P] = k
            self.cache.v[layer][slot, :, :P] = v
        self.cache.lengths[slot] = self.cache.pos[slot] = P
        self.cache.valid[slot, :P] = True
        job.fed = P                                   # 从前缀之后开始预填充
        self.prefix_hits += P

    # ---- 给服务器用的接口（任何线程都可以调用）
    def submit(self, job: Job) -> Job:
        if len(job.prompt) + job.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(job.prompt)}) + max_new_tokens ({job.max_new_tokens}) > {self.max_len}")
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            job.t_submit = time.perf_counter()
            self.waiting.append(job)
            self.cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """客户端断开：下一步开始时这个序列就退出，位置立刻让给别人。"""
        job.cancelled = True
        with self.cv:
            self.cv.notify()

    def busy(self) -> tuple[int, int]:
        return len(self.waiting), sum(j is not None for j in self.slots)

    def start(self) -> "Engine":
        # 引擎线程是唯一跑模型的线程。坑（本课实测）：torch 的 CPU 并行用 OpenMP，OpenMP 给每个调用线程
        # 各建一组工作线程并一直留着；两组加起来多于 CPU 核数时，GNU OpenMP 不再"忙等"下一个任务而是睡眠、
        # 每个并行算子都要等线程被唤醒——2 核上 int8 解码一步慢 1.7～1.9 倍（benchmarks/omp_threads.py：
        # 批大小 1 从 19 ms 到 32 ms，批大小 8 从 27 ms 到 51 ms；fp32 慢 1.05～1.23 倍）。
        # 所以模型在会退出的加载线程里加载，主线程不碰 torch 运算（--demo 和 benchmarks/serve_load.py 都如此）。
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.running = False
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)
        for job in [j for j in self.slots if j] + list(self.waiting):
            self._finish(job, "cancelled")
        self.waiting.clear()

    # ---- 调度循环
    def _loop(self) -> None:
        while True:
            with self.cv:
                self._admit()
                while self.running and not any(self.slots):
                    self.cv.wait()
                    self._admit()
                if not self.running:
                    return
            try:
                self.step()
            except Exception:                 # 一步出错：结束当前这些请求，引擎继续服务后来的
                import traceback
                traceback.print_exc()
                for job in [j for j in self.slots if j]:
                    self._finish(job, "error")

    def _admit(self) -> None:
        """等待中的请求占据空闲的行（最小的空行号，让运行中的行尽量挤在前面）。"""
        for i, job in enumerate(self.slots):
            if job is not None and job.cancelled:
                self._finish(job, "cancelled")
        while self.waiting and self.waiting[0].cancelled:
            self._finish(self.waiting.popleft(), "cancelled")
        for slot in range(self.limit):
            if not self.waiting:
                break
            if self.slots[slot] is None:
                job = self.waiting.popleft()
                job.slot, job.fed, job.generated = slot, 0, []
                job.gen = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
                self.cache.reset_rows([slot])                 # 这一行从空开始
                self._reuse_prefix(job, slot)
                self.slots[slot] = job
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            waiting, running = self.busy()
            self.metrics.queue.set(waiting)
            self.metrics.batch.set(running)

    @torch.inference_mode()
    def step(self) -> None:
        """一步 = 一次批量前向：新来者喂提示词（最多 chunk 个 token），其他行各喂上一步生成的 token。"""
        t0 = time.perf_counter()
        n = 1 + max(i for i, j in enumerate(self.slots) if j is not None)   # 只算前 n 行，空闲的尾部行不参与
        feeds = []
        for job in self.slots[:n]:
            if job is None:
                feeds.append([])                                           # 空行：全是 padding
            elif job.fed < len(job.prompt):
                feeds.append(job.prompt[job.fed:job.fed + self.chunk])     # 预填充（分块）
            else:
                feeds.append([job.generated[-1]])                          # 解码：1 个真 token
        T = max(len(f) for f in feeds)
        ids = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.long)
        for r, f in enumerate(feeds):                                      # 右侧补 padding + mask
            ids[r, :len(f)] = torch.tensor(f, dtype=torch.long)
            mask[r, :len(f)] = 1
        dev = self.model.device
        logits = self.model(ids.to(dev), cache=self.cache.first_rows(n), attention_mask=mask.to(dev), last_only=True)
        greedy = logits.argmax(-1).tolist()                                # [n]：每行下一个 token 的 logits
        for r, job in enumerate(self.slots[:n]):
            if job is None:
                continue
            if job.fed < len(job.prompt):
                job.fed += len(feeds[r])
                if job.fed < len(job.prompt):
                    continue                                               # 提示词还没喂完
            tok = greedy[r] if job.temperature == 0 else sample_next_token(
                logits[r], job.temperature, 0, job.top_p, generator=job.gen)
            self._emit(job, tok)
        stat = self.step_stats[sum(f != [] for f in feeds)] if T == 1 else self.prefill_stats  # 纯解码步按批大小分
        stat[0] += 1
        stat[1] += time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.step.observe(time.perf_counter() - t0)
        self._gauges()

    def _emit(self, job: Job, tok: int) -> None:
        now = time.perf_counter()
        if tok in job.stop_ids:
            self._finish(job, "stop")
            return
        job.generated.append(tok)
        if self.metrics is not None:
            self.metrics.tokens.inc()
            if len(job.generated) == 1:
                self.metrics.ttft.observe(now - job.t_submit)
            else:
                self.metrics.tpot.observe(now - job.t_last)
        job.t_last = now
        self._send(job, "token", tok)
        if len(job.generated) >= job.max_new_tokens:
            self._finish(job, "length")

    def _finish(self, job: Job, reason: str) -> None:
        if job.slot >= 0 and self.slots[job.slot] is job:
            self.slots[job.slot] = None
            self.cache.reset_rows([job.slot])
        job.finish_reason = reason
        self._send(job, "done", reason)

    @staticmethod
    def _send(job: Job, kind: str, value) -> None:
        try:
            job.on_event(kind, value)
        except RuntimeError:           # 事件循环已关闭（服务器正在退出）：没人收了
            pass


# ================================================================ 第 2 部分：服务器（FastAPI）
# Metrics、ApiError、Auth、RateLimiter、Sessions 是每个服务系统都有的“外围零件”，放在 common/serving.py；
# 本课讲的是引擎（上面）和下面的 OpenAI 兼容路由。
from common.serving import ApiError, Auth, Metrics, RateLimiter, Sessions  # noqa: E402



class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|developer|user|assistant|tool)$")
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    """OpenAI 的 /v1/chat/completions 请求体（本服务器支持的字段；其他字段忽略）。"""
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    session_id: str | None = Field(None, pattern=SESSION_ID)   # 扩展：接着某个会话聊
    ignore_eos: bool = False                                    # 扩展（vLLM 也有）：压测时固定生成长度


class GenerateRequest(BaseModel):
    """原教程自己的 /v1/generate：一句话进，一段话出，可带会话。"""
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    session_id: str | None = Field(None, pattern=SESSION_ID)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


class Reply:
    """服务器这边的一个请求：把引擎线程送来的 token 变成文字片段（处理 stop 字符串和断开）。"""

    def __init__(self, srv: "Server", job: Job, stops: list[str]):
        import asyncio

        self.srv, self.job, self.stops = srv, job, [s for s in stops if s]
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_event = lambda kind, value: loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        self.finish: str | None = None          # stop / length，断开时保持 None
        self.text = ""

    async def pieces(self, request: Request | None = None):
        """逐段产出文字。request 给出时（非流式）每秒检查一次客户端是否已断开。"""
        import asyncio

        dec, sent = self.srv.lm.tokenizer.stream_decoder(), 0
        hold = max((len(s) for s in self.stops), default=1) - 1   # 可能是 stop 开头的尾巴先不发
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(self.queue.get(), 1.0 if request else None)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                self.text += dec.feed(value) if kind == "token" else dec.flush()
                cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
                if cut >= 0 or kind == "done":
                    end = cut if cut >= 0 else len(self.text)
                    self.text, self.finish = self.text[:end], "stop" if cut >= 0 else value
                    if end > sent:
                        yield self.text[sent:end]
                    return
                if len(self.text) - hold > sent:
                    yield self.text[sent:len(self.text) - hold]
                    sent = len(self.text) - hold
        finally:
            if self.job.finish_reason is None:        # 断开或命中 stop：让引擎立刻释放这一行
                self.srv.engine.cancel(self.job)

    def usage(self) -> dict:
        p, c = len(self.job.prompt), len(self.job.generated)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _text_of(content) -> str:
    if isinstance(content, list):                 # [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


class Server:
    """服务器的全部状态：模型 + 引擎、认证、限流、会话库、指标。"""

    def __init__(self, *, auth: Auth, rate_limit_rpm: int, session_db, max_batch: int, max_context: int,
                 prefill_chunk: int, max_queue: int, default_max_tokens: int, load_model: Callable,
                 prefix_cache: bool = True):
        self.auth, self.limiter, self.metrics = auth, RateLimiter(rate_limit_rpm), Metrics()
        self.session_db, self.sessions = session_db, None
        self.engine_args = dict(max_batch=max_batch, max_len=max_context, prefill_chunk=prefill_chunk,
                                max_queue=max_queue)
        self.max_context, self.default_max_tokens = max_context, default_max_tokens
        self.load_model, self.lm, self.engine, self.prefix_cache = load_model, None, None, prefix_cache
        self.stop_note: str | None = None          # 停止后打印的一句话（前台运行时）
        self.model_id = "loading"                  # 模型加载后才知道：smollm2-135m-instruct / tiny-gpt-<预设名> ……

    def start(self) -> None:
        """打开会话库；在后台线程加载模型（加载完之前 /readyz 回 503）。"""
        self.sessions = Sessions(self.session_db)
        threading.Thread(target=self._load, name="loader", daemon=True).start()

    def _load(self) -> None:
        lm = self.load_model()
        engine = Engine(lm.model, metrics=self.metrics, **self.engine_args)
        prefix = lm.tokenizer.apply_chat_template([], add_generation_prompt=False)
        if self.prefix_cache and prefix:              # 默认系统提示词：每个没自带系统消息的请求都以它开头
            engine.set_prefix(prefix)
        self.engine = engine.start()
        self.model_id = getattr(lm, "model_id", None) or MODEL_IDS[lm.key]
        self.lm = lm

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.sessions is not None:
            self.sessions.close()
        if self.stop_note:
            print(self.stop_note, flush=True)

    def ready(self) -> bool:
        return self.lm is not None

    def guard(self, request: Request) -> str:
        """每个 /v1 请求先过这里：认证 → 限流 → 模型是否就绪。返回调用者身份。"""
        who = self.auth.identify(request.headers, request.client.host if request.client else "?")
        self.limiter.check(who)
        if not self.ready():
            raise ApiError(503, "模型还在加载，请稍后再试（GET /readyz 返回 200 后即可）", "server_error",
                           "not_ready", {"Retry-After": "2"})
        return who

    def history(self, session: str | None, who: str) -> list[dict]:
        if session is None:
            return []
        msgs = self.sessions.get(session, who)
        if msgs is None:
            raise ApiError(404, f"会话 {session} 不存在", code="session_not_found")
        return msgs

    def submit(self, messages: list[dict], max_new: int | None, temperature: float, top_p: float,
               seed: int | None, stops: list[str], ignore_eos: bool = False) -> Reply:
        tok = self.lm.tokenizer
        try:
            prompt = tok.apply_chat_template(messages)
        except UserError as e:                     # 小 GPT 的字符表里没有的字符
            raise ApiError(400, str(e), code="invalid_prompt") from None
        room = self.max_context - len(prompt)
        if room < 1:
            raise ApiError(400, f"提示词有 {len(prompt)} 个 token，超过了上下文上限 {self.max_context}",
                           code="context_length_exceeded")
        if max_new is not None and max_new > room:
            raise ApiError(400, f"max_tokens={max_new} 太大：提示词 {len(prompt)} 个 token，"
                                f"上下文上限 {self.max_context}，最多还能生成 {room} 个", code="context_length_exceeded")
        job = Job(prompt, max_new or min(self.default_max_tokens, room), temperature, top_p, seed,
                  frozenset() if ignore_eos else frozenset(tok.eos_ids))
        reply = Reply(self, job, stops)
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(503, "服务器忙：等待队列已满，请稍后重试", "server_error", "queue_full",
                           {"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(len(prompt))
        return reply


def _sse(obj) -> str:
    import json
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(status: int, message: str, type_: str = "invalid_request_error", code=None, headers=None, param=None):
    from fastapi.responses import JSONResponse
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def on_api_error(request: Request, e: ApiError):
    return _error(e.status, e.message, e.type, e.code, e.headers)


async def on_invalid(request: Request, e):
    """FastAPI 的校验错误：坏 JSON → 400，字段类型/取值不对 → 422。"""
    errs = e.errors()
    if any(x.get("type") == "json_invalid" for x in errs):
        return _error(400, "请求体不是合法的 JSON", code="invalid_json")
    where = ".".join(str(p) for p in errs[0].get("loc", ()) if p != "body")
    return _error(422, f"参数 {where} 无效：{errs[0].get('msg')}", code="invalid_value", param=where)


async def on_http_error(request: Request, e):
    return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)


class CountRequests:
    """一个最简单的 ASGI 中间件：按路由和状态码数请求（llm_requests_total）。"""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        status = [500]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_)
        finally:
            if scope["type"] == "http":
                self.metrics.requests.labels(getattr(scope.get("route"), "path", "other"), str(status[0])).inc()


def srv_of(request: Request) -> Server:
    return request.app.state.srv


async def caller(request: Request) -> str:
    """每个 /v1 路由的依赖：认证 → 限流 → 模型就绪，返回调用者身份。"""
    return srv_of(request).guard(request)


async def healthz():
    return {"status": "ok"}


async def readyz(request: Request):
    if not srv_of(request).ready():
        return _error(503, "模型还在加载", "server_error", "not_ready")
    return {"status": "ready", "model": srv_of(request).model_id}


async def metrics(request: Request):
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    return Response(generate_latest(srv_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def oauth_token(request: Request):
    """OAuth2 密码模式：表单 username/password → 有效期有限的 JWT（之后当 Bearer token 用）。"""
    from urllib.parse import parse_qs

    auth = srv_of(request).auth
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
    if form.get("grant_type", "password") != "password" or not auth.users:
        raise ApiError(400, "只支持 grant_type=password（且服务器要配置了 LLM_USERS）", code="unsupported_grant_type")
    token = auth.issue_token(form.get("username", ""), form.get("password", ""))
    return {"access_token": token, "token_type": "bearer", "expires_in": int(auth.expire_minutes * 60)}


async def list_models(request: Request, who: str = Depends(caller)):
    return {"object": "list", "data": [{"id": srv_of(request).model_id, "object": "model", "created": 0,
                                        "owned_by": "llm-course"}]}


async def chat_completions(body: ChatRequest, request: Request, who: str = Depends(caller)):
    """OpenAI 兼容的对话接口：stream=true 时按 SSE 一块一块发，最后 data: [DONE]。"""
    from fastapi.responses import StreamingResponse

    srv = srv_of(request)
    if body.model != srv.model_id:
        raise ApiError(404, f"没有模型 {body.model!r}：本服务器只有 {srv.model_id}", code="model_not_found")
    new = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    reply = srv.submit(srv.history(body.session_id, who) + new, body.max_completion_tokens or body.max_tokens,
                       1.0 if body.temperature is None else body.temperature,
                       1.0 if body.top_p is None else body.top_p, body.seed, stops, body.ignore_eos)
    head = {"id": f"chatcmpl-{reply.job.id}", "created": int(time.time()), "model": srv.model_id}

    def remember():                    # 只有完整结束的回答才写进会话
        if body.session_id and reply.finish in ("stop", "length"):
            srv.sessions.append(body.session_id, who, new + [{"role": "assistant", "content": reply.text}])

    async def events():
        chunk = {**head, "object": "chat.completion.chunk"}
        first = {"role": "assistant", "content": ""}
        yield _sse({**chunk, "choices": [{"index": 0, "delta": first, "finish_reason": None}]})
        async for piece in reply.pieces():
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish}]})
        if (body.stream_options or {}).get("include_usage"):
            yield _sse({**chunk, "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"
        remember()

    if body.stream:
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async for _ in reply.pieces(request):
        pass
    remember()
    message = {"role": "assistant", "content": reply.text}
    return {**head, "object": "chat.completion", "usage": reply.usage(),
            "choices": [{"index": 0, "message": message, "finish_reason": reply.finish}]}


async def generate_text(body: GenerateRequest, request: Request, who: str = Depends(caller)):
    """原教程的 /v1/generate：不带 session_id 时新建一个会话，带上就接着聊。"""
    srv = srv_of(request)
    session = body.session_id or uuid.uuid4().hex
    new = [{"role": "user", "content": body.prompt}]
    reply = srv.submit(srv.history(body.session_id, who) + new, body.max_new_tokens, body.temperature,
                       body.top_p, body.seed, [])
    async for _ in reply.pieces(request):
        pass
    if reply.finish in ("stop", "length"):
        srv.sessions.append(session, who, new + [{"role": "assistant", "content": reply.text}])
    return {"text": reply.text, "session_id": session, "finish_reason": reply.finish, "usage": reply.usage()}


async def get_session(session_id: str, request: Request, who: str = Depends(caller)):
    msgs = srv_of(request).sessions.get(session_id, who)
    if not msgs:
        raise ApiError(404, f"会话 {session_id} 不存在", code="session_not_found")
    return {"id": session_id, "messages": msgs}


async def delete_session(session_id: str, request: Request, who: str = Depends(caller)):
    if not srv_of(request).sessions.delete(session_id, who):
        raise ApiError(404, f"会话 {session_id} 不存在", code="session_not_found")
    return {"id": session_id, "deleted": True}


def build_app(srv: Server) -> FastAPI:
    """把上面的函数挂到路径上。lifespan：启动时加载模型，所有连接结束后停引擎、关数据库。"""
    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        srv.start()
        yield
        srv.stop()

    app = FastAPI(title="LLM 零基础实践教程 · 第 6 课", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.srv = srv
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_middleware(CountRequests, metrics=srv.metrics)
    for path, fn, methods in [("/healthz", healthz, ["GET"]), ("/readyz", readyz, ["GET"]),
                              ("/metrics", metrics, ["GET"]), ("/oauth/token", oauth_token, ["POST"]),
                              ("/v1/models", list_models, ["GET"]),
                              ("/v1/chat/completions", chat_completions, ["POST"]),
                              ("/v1/generate", generate_text, ["POST"]),
                              ("/v1/sessions/{session_id}", get_session, ["GET"]),
                              ("/v1/sessions/{session_id}", delete_session, ["DELETE"])]:
        app.add_api_route(path, fn, methods=methods)
    return app


# ================================================================ 第 3 部分：启动服务器
def bind(host: str, port: int):
    """先自己绑定端口：端口被占用时给一句中文错误；port=0 让系统挑一个空闲端口（演示和测试用）。"""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"无法监听 {host}:{port}（{e.strerror}）：端口被占用？换一个 --port。") from None
    return sock


class Running:
    """在后台线程里运行的 uvicorn 服务器（--demo 和测试用）：with 块结束时优雅退出。"""

    def __init__(self, srv: Server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 wait_ready: bool = True):
        import uvicorn

        self.srv, self.sock, self.wait_ready = srv, bind(host, port), wait_ready
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(build_app(srv), log_level=log_level,
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + 300
        while not (self.server.started and (self.srv.ready() or not self.wait_ready)):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UserError("服务器没能启动（见上面的日志）。")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def settings_from_env(args) -> dict:
    """认证、限流、会话库：命令行参数 > 环境变量 > 默认值。密钥只读不打印。"""
    import os
    import secrets

    def number(name, default, kind=float):
        text = (os.environ.get(name) or "").strip()
        try:
            value = kind(text) if text else default
        except ValueError:
            value = -1
        if value < 0:
            raise UserError(f"环境变量 {name}={text!r} 无效：需要非负数。")
        return value

    keys = args.api_keys if args.api_keys is not None else os.environ.get("LLM_API_KEYS", "")
    users = {}
    for item in filter(None, (x.strip() for x in os.environ.get("LLM_USERS", "").split(","))):
        name, sep, password = item.partition(":")
        if not (sep and name and password):
            raise UserError("环境变量 LLM_USERS 格式应为 用户名:密码,用户名:密码")
        users[name] = password
    secret = os.environ.get("LLM_JWT_SECRET") or ""
    if users and not secret:
        print("[认证] 没有设置 LLM_JWT_SECRET：本次用随机密钥签发 JWT（重启后旧 token 失效）。")
    rpm = args.rate_limit_rpm if args.rate_limit_rpm is not None else number("LLM_RATE_LIMIT_RPM", 0, int)
    return dict(auth=Auth([k.strip() for k in keys.split(",") if k.strip()], users,
                          secret or secrets.token_urlsafe(32), number("LLM_JWT_EXPIRE_MINUTES", 30.0)),
                rate_limit_rpm=rpm,
                session_db=args.session_db or os.environ.get("LLM_SESSION_DB") or args.out_dir / "sessions.sqlite3")


def load_model_of(args):
    """--checkpoint：第 04 课训练的小 GPT（它导出的 model.pt2 + 检查点里的权重）；否则本地 SmolLM2 / Qwen。"""
    if args.checkpoint:
        from common.exported import load_tiny_gpt
        return load_tiny_gpt(args.checkpoint)
    from common.local_model import load_local_model
    return load_local_model(dtype=args.dtype, device=args.torch_device)


def make_server(args, lm=None, **overrides) -> Server:
    settings = {**settings_from_env(args), **overrides}
    if args.checkpoint and lm is None:           # 小模型加载只要一秒：当场加载，文件有问题立刻报错退出
        lm = load_model_of(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return Server(**settings, max_batch=args.max_batch, max_context=args.max_context,
                  prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
                  default_max_tokens=args.max_new_tokens, prefix_cache=not args.no_prefix_cache,
                  load_model=lambda: lm or load_model_of(args))


def serve_forever(args) -> None:
    """python 06_serve.py：前台运行，Ctrl-C / SIGTERM 时停止接收新请求、等进行中的流结束、关数据库。"""
    import uvicorn

    srv = make_server(args)
    auth = srv.auth
    if not auth.enabled:
        where = "" if args.host in ("127.0.0.1", "localhost", "::1") else \
            f"  警告：监听 {args.host} 且没有认证，同一网络里的任何人都能用！请设置 LLM_API_KEYS。"
        print(f"[认证] 关闭（没有配置 LLM_API_KEYS / --api-keys / LLM_USERS）。{where}")
    else:
        print(f"[认证] 开启：{len(auth.keys)} 个 API key，{len(auth.users)} 个用户（key 本身不会打印）。")
    print(f"[服务] 正在启动 http://{args.host}:{args.port}/v1 （模型 {args.checkpoint or MODEL_IDS[args.local_model]}；最多 {args.max_batch} 个序列同时生成）")
    print(f"       试试：python 01_hello_llm.py --base-url http://{args.host}:{args.port}/v1    按 Ctrl-C 停止。")
    sock = bind(args.host, args.port)
    srv.stop_note = "[服务] 已停止：进行中的请求已结束，引擎已停，会话数据库已关闭。"
    uvicorn.Server(uvicorn.Config(build_app(srv), log_level="info", timeout_graceful_shutdown=30)).run(sockets=[sock])


# ================================================================ 第 4 部分：演示（--demo）
PROMPTS = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence why the sky is blue.",
    "Give me two tips for learning a new language quickly and remembering new words.",
    "Describe a cat to someone who has never seen one, using simple words.",
    "List the planets of the solar system in order from the sun.",
    "Tell me a short story about a robot who wants to become a painter.",
]


def banner(title: str) -> None:
    print("\n" + "=" * 70 + f"\n{title}\n" + "=" * 70)


def check(ok: bool, message: str) -> None:
    """自检：不成立就以一句中文退出（非零退出码）。"""
    if not ok:
        raise UserError(f"自检失败：{message}")


def http_get(url: str, key: str | None = None) -> str:
    import urllib.request
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode("utf-8")


def tour_auth(run: Running, client, user: tuple[str, str]) -> dict:
    """OAuth2 换 JWT、错误的 key（401）、限流（429）。"""
    import json
    import urllib.request

    import openai

    form = f"grant_type=password&username={user[0]}&password={user[1]}".encode()
    with urllib.request.urlopen(urllib.request.Request(run.base_url.removesuffix("/v1") + "/oauth/token", form)) as r:
        token = json.loads(r.read())
    jwt_models = openai.OpenAI(base_url=run.base_url, api_key=token["access_token"], max_retries=0).models.list()
    print(f"\nOAuth2 密码模式：用户 {user[0]} 换到一个 JWT（{token['expires_in']} 秒后过期），用它列出模型："
          f"{[m.id for m in jwt_models]}（token 本身不打印）")

    status = {}
    try:
        openai.OpenAI(base_url=run.base_url, api_key="wrong-key", max_retries=0).models.list()
    except openai.AuthenticationError as e:
        status["401"] = e.status_code
        print(f"错误的 key → {e.status_code}：{e.body['message'] if isinstance(e.body, dict) else e}")
    run.srv.limiter.rpm = 3                         # 演示：临时把限流设成每分钟 3 次
    try:
        for i in range(4):
            client.models.list()
    except openai.RateLimitError as e:
        status["429"] = e.status_code
        print(f"每分钟限 3 次，第 {i + 1} 次 → {e.status_code}，Retry-After: {e.response.headers.get('retry-after')} 秒")
    run.srv.limiter.rpm, run.srv.limiter.hits = 0, collections.defaultdict(collections.deque)
    check(status == {"401": 401, "429": 429}, f"认证/限流没有按预期返回 401/429：{status}")
    return status


def tour(run: Running, key: str, user: tuple[str, str], n_tokens: int) -> dict:
    """openai SDK 当客户端：流式、会话、JWT、401、429、/metrics。"""
    import json

    import openai
    from prometheus_client.parser import text_string_to_metric_families

    client = openai.OpenAI(base_url=run.base_url, api_key=key, max_retries=0)
    banner("第 1 部分：用官方 openai SDK 访问我们自己的服务器")
    print(f"地址 {run.base_url}，模型列表：{[m.id for m in client.models.list()]}")
    print("流式回答：", end="", flush=True)
    t0, first, pieces = time.perf_counter(), None, 0
    for ch in client.chat.completions.create(model=run.srv.model_id, messages=[{"role": "user", "content": PROMPTS[3]}],
                                             max_tokens=n_tokens, temperature=0, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces += 1
            print(ch.choices[0].delta.content, end="", flush=True)
    print(f"\n  → {pieces} 个 SSE 片段，首 token 延迟 {first * 1000:.0f} ms")

    sid, ask = f"demo-{uuid.uuid4().hex[:8]}", dict(model=run.srv.model_id, max_tokens=n_tokens, temperature=0)
    r1 = client.chat.completions.create(messages=[{"role": "user", "content": "My name is Lin. Say hello to me."}],
                                        extra_body={"session_id": sid}, **ask)
    r2 = client.chat.completions.create(messages=[{"role": "user", "content": "What is my name?"}],
                                        extra_body={"session_id": sid}, **ask)
    history = json.loads(http_get(run.base_url + f"/sessions/{sid}", key))["messages"]
    print(f"\n会话 {sid}：第二问的提示词有 {r2.usage.prompt_tokens} 个 token（第一问 {r1.usage.prompt_tokens} 个）"
          f"——服务器把历史拼了进去。\n  第二问的回答：{r2.choices[0].message.content!r}；数据库里现在有 {len(history)} 条消息。")
    check(len(history) == 4 and r2.usage.prompt_tokens > r1.usage.prompt_tokens, "会话历史没有保存或没有用上")

    status = tour_auth(run, client, user)

    families = {f.name: f for f in text_string_to_metric_families(http_get(run.base_url.removesuffix("/v1") + "/metrics"))}
    value = {s.name: s.value for f in families.values() for s in f.samples}
    print(f"\n/metrics（Prometheus 文本格式，{len(families)} 个指标族）：已生成 token "
          f"{value['llm_generated_tokens_total']:.0f} 个，首 token 延迟的直方图里有 "
          f"{value['llm_time_to_first_token_seconds_count']:.0f} 个样本，平均 "
          f"{value['llm_time_to_first_token_seconds_sum'] / max(1, value['llm_time_to_first_token_seconds_count']) * 1000:.0f} ms")
    return {"session_messages": len(history), "second_prompt_tokens": r2.usage.prompt_tokens,
            "first_prompt_tokens": r1.usage.prompt_tokens, "status": status,
            "generated_tokens": value["llm_generated_tokens_total"]}


def one_client(base_url: str, key: str, model: str, plan: list[tuple[str, int]]) -> list[dict]:
    """一个压测客户端：依次发 plan 里的流式请求，记录每个内容片段到达的时刻。"""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
    out = []
    for prompt, n in plan:
        t0, times, text, usage = time.perf_counter(), [], "", None
        for ch in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            if ch.choices and ch.choices[0].delta.content:
                times.append(time.perf_counter())
                text += ch.choices[0].delta.content
            usage = ch.usage or usage
        out.append({"want": n, "tokens": usage.completion_tokens, "ttft": times[0] - t0, "text": text,
                    "gaps": [b - a for a, b in zip(times, times[1:])], "times": times})
    return out


def percentile(values: list[float], q: float) -> float:
    import numpy as np
    return float(np.percentile(values, q)) if values else float("nan")


def load_round(run: Running, key: str, n_clients: int, per_client: int, max_tokens: int, seed: int) -> dict:
    """n 个客户端同时开跑；总吞吐 = 所有生成的 token / 从开始到最后一个结束的时间。"""
    import random
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(seed * 1000 + n_clients)       # 两种模式用完全相同的请求
    plans = [[(rng.choice(PROMPTS), rng.randint(max(1, max_tokens // 2), max_tokens)) for _ in range(per_client)]
             for _ in range(n_clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        per = list(pool.map(lambda p: one_client(run.base_url, key, run.srv.model_id, p), plans))
    seconds = time.perf_counter() - t0
    records = [r for rs in per for r in rs]
    # 稳态吞吐：只算"所有客户端都还在"的那段时间（到第一个客户端收完为止），不含最后的收尾阶段
    full_until = min(rs[-1]["times"][-1] for rs in per)
    window = 0.0
    for r in records:                          # 每个请求按"收到的片段有几成在窗口内"折算 token 数
        times = r.pop("times")
        window += r["tokens"] * sum(t <= full_until for t in times) / len(times)
    check(all(r["tokens"] == r["want"] for r in records), "有请求生成的 token 数不等于 max_tokens（ignore_eos）")
    gaps = [g for r in records for g in r["gaps"]]
    ttft = [r["ttft"] for r in records]
    tokens = sum(r["tokens"] for r in records)
    return {"clients": n_clients, "requests": len(records), "tokens": tokens, "seconds": round(seconds, 3),
            "tok_s": tokens / seconds, "steady_tok_s": window / (full_until - t0),
            "ttft_p50_ms": percentile(ttft, 50) * 1000,
            "ttft_p95_ms": percentile(ttft, 95) * 1000, "tpot_p50_ms": percentile(gaps, 50) * 1000,
            "tpot_p95_ms": percentile(gaps, 95) * 1000, "texts": [r["text"] for r in records]}


def load_test(run: Running, key: str, clients: list[int], per_client: int, max_tokens: int, seed: int) -> dict:
    """每个并发数先测"一次一个"（引擎只用 1 行），再测连续批处理；交替进行，机器负载的变化对两边一样。"""
    from tqdm import tqdm

    engine, rows = run.srv.engine, run.srv.engine.cache.batch
    one_client(run.base_url, key, run.srv.model_id, [(PROMPTS[0], 2)])                 # 预热
    out = {"one_at_a_time": [], "batching": []}
    steps, alone = {}, {}                   # 连续批处理时按批大小的解码步；一次一个时的解码步 / 预填充步

    def add(acc: dict, key, count_secs) -> None:
        count, secs = acc.get(key, (0, 0.0))
        acc[key] = (count + count_secs[0], secs + count_secs[1])
    for n in tqdm(clients, desc="压测（并发客户端数）", unit="轮"):
        for mode, limit in (("one_at_a_time", 1), ("batching", rows)):
            engine.limit = limit
            engine.step_stats.clear()
            engine.prefill_stats = [0, 0.0]
            out[mode].append(load_round(run, key, n, per_client, max_tokens, seed))
            if mode == "batching":
                for b, count_secs in engine.step_stats.items():
                    add(steps, b, count_secs)
            else:
                add(alone, "decode", engine.step_stats.get(1, (0, 0.0)))
                add(alone, "prefill", engine.prefill_stats)
    engine.limit = rows
    same = sum(a == b for x, y in zip(out["one_at_a_time"], out["batching"]) for a, b in zip(x["texts"], y["texts"]))
    total = sum(len(x["texts"]) for x in out["batching"])
    for mode in out.values():
        for row in mode:
            row.pop("texts")
    out["step_ms"] = {b: 1000 * s / c for b, (c, s) in sorted(steps.items())}
    out["alone_ms"] = {k: 1000 * s / c for k, (c, s) in alone.items() if c}
    out["same_text"], out["compared"] = same, total
    return out


def report(load: dict, weight_mb: float | None, dtype: str = "fp32") -> dict:
    """打印表格，并用本次实测的数字解释结果。返回要写进 results.json 的结论。"""
    one, bat = load["one_at_a_time"], load["batching"]
    print(f"\n{'并发':>4} | {'一次一个 tok/s':>14} {'TTFT p50/p95 ms':>17} | {'连续批处理 tok/s':>16} "
          f"{'TTFT p50/p95 ms':>17} {'每 token p50/p95 ms':>19} | 倍数")
    for a, b in zip(one, bat):
        print(f"{a['clients']:>4} | {a['tok_s']:>14.1f} {a['ttft_p50_ms']:>8.0f}/{a['ttft_p95_ms']:<8.0f} | "
              f"{b['tok_s']:>16.1f} {b['ttft_p50_ms']:>8.0f}/{b['ttft_p95_ms']:<8.0f} "
              f"{b['tpot_p50_ms']:>9.0f}/{b['tpot_p95_ms']:<9.0f} | {b['tok_s'] / a['tok_s']:.2f}×")
    speedup = {b["clients"]: b["tok_s"] / a["tok_s"] for a, b in zip(one, bat)}
    top = max(speedup)
    print(f"\n{top} 个并发客户端时，连续批处理的总吞吐是一次一个的 {speedup[top]:.2f} 倍"
          f"（{bat[-1]['tok_s']:.1f} vs {one[-1]['tok_s']:.1f} tokens/s）。")
    steady = {b["clients"]: b["steady_tok_s"] / a["steady_tok_s"] for a, b in zip(one, bat)}
    print(f"  只算 {top} 个客户端都在线的那段时间（去掉最后几个请求收尾、批变小的阶段）：{steady[top]:.2f} 倍"
          f"（{bat[-1]['steady_tok_s']:.1f} vs {one[-1]['steady_tok_s']:.1f} tokens/s）。"
          f"每个客户端发的请求越多，收尾占比越小，两个数越接近。")
    steps = load["step_ms"]
    if 1 in steps and len(steps) > 1:
        big = max(steps)
        ratio = steps[big] / steps[1]
        print(f"为什么：解码时每一步都要把全部权重从内存读一遍。实测纯解码的一步，批大小 1 用 {steps[1]:.0f} ms，"
              f"批大小 {big} 用 {steps[big]:.0f} ms——{big} 倍的 token 只多花了 {ratio:.2f} 倍时间，"
              f"每个 token 的时间降到批大小 1 时的 {ratio / big:.2f} 倍。")
        if weight_mb:
            print(f"  （批大小 1 时一步读约 {weight_mb:.0f} MB 权重，相当于 {weight_mb / steps[1]:.1f} GB/s："
                  f"这一步是'读内存受限'，计算单元大多在等数据；多放几行进来，读一次权重就能多算几个 token。）")
    ceil = ceiling(load, 8 if 8 in speedup else top)
    if ceil:
        rows = ceil["rows"]
        print(f"上限（用本次测到的数估算，{ceil['clients']} 个客户端）：一次一个时每个请求 = 一次预填充 "
              f"{ceil['prefill_ms']:.0f} ms + {ceil['tokens_per_request'] - 1:.1f} 个解码步 × {ceil['decode1_ms']:.0f} ms。"
              f"连续批处理能把解码步分给 {rows} 行（批大小 {rows} 一步 {ceil['decode_rows_ms']:.0f} ms），但预填充主要是算力，"
              f"批处理省不了多少。假设一点也省不了，就算每一步都坐满 {rows} 行，倍数也只有约 {ceil['max_speedup']:.2f}"
              f"（实测 {speedup[ceil['clients']]:.2f}；预填充和解码挤在同一步时能共用一次读权重，所以实测可以略高于它）；"
              f"回答越长，预填充的占比越小，上限越接近纯解码的 {ceil['pure_decode_speedup']:.1f} 倍。")
    gains = [b["tok_s"] / a["tok_s"] for a, b in zip(bat, bat[1:])]
    i = next((i for i in range(1, len(bat)) if all(g < 1.25 for g in gains[i - 1:])), None)  # 此后每步都 < 1.25 倍
    flat = bat[i]["clients"] if i else None
    if flat:
        gain = bat[i]["tok_s"] / bat[i - 1]["tok_s"]
        why = ("批大了以后矩阵乘变成'算力受限'，2 个核心的算力用满了，再加上注意力和 padding 的开销"
               if gain >= 1 else "吞吐反而下降了：多半是别的程序在抢 CPU（看看结尾的机器负载）")
        print(f"曲线在 {bat[i - 1]['clients']} → {flat} 个客户端时变平（吞吐 ×{gain:.2f}）：{why}。")
    else:
        print("在测到的范围内，吞吐还在随并发数明显上升（没有变平）。")
    a, b, c = bat[0], bat[-1], one[-1]
    grew = "变成" if b["tpot_p50_ms"] > a["tpot_p50_ms"] else "（这次没有变长）仍是"
    print(f"代价是延迟：每 token 间隔 p50 从 {a['clients']} 个客户端时的 {a['tpot_p50_ms']:.0f} ms {grew} "
          f"{b['clients']} 个时的 {b['tpot_p50_ms']:.0f} ms（每步要算的行更多；新请求的预填充也插在解码步里）。")
    print(f"一次一个时，{c['clients']} 个客户端的 TTFT p95 是 {c['ttft_p95_ms'] / 1000:.1f} 秒（排队等前面的人走完），"
          f"连续批处理是 {b['ttft_p95_ms'] / 1000:.1f} 秒"
          + ("：新请求下一步就能加入。" if b["ttft_p95_ms"] < c["ttft_p95_ms"] else "：这次并没有更短（机器太忙？）。"))
    why = ("int8 的激活量化按整个批算缩放系数，同一个请求和谁同批，舍入就不同；所以'批处理 == 单独算'只在 fp32 上检查"
           if dtype == "int8" else "批量计算的浮点舍入和单独算有 1e-5 级差别，两个 token 分数几乎相等时会选得不同")
    print(f"两种模式下同一请求的贪心输出逐字相同：{load['same_text']}/{load['compared']}"
          + ("。" if load["same_text"] == load["compared"] else f"（不同的那几个：{why}）。"))
    return {"speedup": speedup, "speedup_steady": steady, "flattens_at": flat, "ceiling": ceil}


def ceiling(load: dict, clients: int) -> dict | None:
    """c 个客户端时倍数的估算上限：假设预填充的时间批处理一点也省不了，解码步最多分给 b = min(c, 测到的最大批) 行。"""
    alone, steps = load.get("alone_ms", {}), load["step_ms"]
    row = next((r for r in load["batching"] if r["clients"] == clients), None)
    b = min(clients, max(steps, default=0))
    if row is None or "decode" not in alone or "prefill" not in alone or b not in steps:
        return None
    n, P, d1, db = row["tokens"] / row["requests"], alone["prefill"], alone["decode"], steps[b]
    return {"clients": clients, "rows": b, "tokens_per_request": n, "prefill_ms": P, "decode1_ms": d1,
            "decode_rows_ms": db, "max_speedup": (P + (n - 1) * d1) / (P + (n - 1) * db / b),
            "pure_decode_speedup": b * d1 / db}


def plot(load: dict, path) -> None:
    from common.plots import new_figure, save_figure

    fig, (ax1, ax2) = new_figure(2)
    for mode, label in (("one_at_a_time", "one at a time"), ("batching", "continuous batching")):
        rows = load[mode]
        x = [r["clients"] for r in rows]
        ax1.plot(x, [r["tok_s"] for r in rows], "o-", label=label)
        ax2.plot(x, [r["ttft_p50_ms"] / 1000 for r in rows], "o-", label=f"{label} p50")
        ax2.plot(x, [r["ttft_p95_ms"] / 1000 for r in rows], "s--", label=f"{label} p95")
    ax1.set(xlabel="concurrent streaming clients", ylabel="aggregate tokens/s", title="Throughput", xscale="log")
    ax2.set(xlabel="concurrent streaming clients", ylabel="seconds", title="Time to first token", xscale="log",
            yscale="log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    print(f"图已保存：{save_figure(fig, path)}")


def demo(args) -> int:
    import os
    import secrets

    from common.outputs import save_results

    clients = args.clients or ([1, 4] if args.quick else [1, 2, 4, 8, 16])
    per_client = args.requests_per_client or (1 if args.quick else 2)
    load_tokens = args.load_tokens or (8 if args.quick else 32)
    key, user = "sk-demo-" + secrets.token_urlsafe(16), ("student", secrets.token_urlsafe(12))
    db = args.out_dir / "demo_sessions.sqlite3"
    # 模型由服务器自己的加载线程加载（见 Engine.start 的注释：主线程一旦跑过 torch 运算，引擎线程就会变慢）
    srv = make_server(args, auth=Auth([key], dict([user]), secrets.token_urlsafe(32), 30), session_db=db)
    print(f"[演示] 进程内启动服务器（认证开启：一个随机 API key 和用户 {user[0]}，都不打印）……")
    t0 = time.perf_counter()
    with Running(srv) as run:
        facts = tour(run, key, user, 12 if args.quick else 24)
        banner(f"第 2 部分：压测——{','.join(map(str, clients))} 个并发流式客户端，每个发 {per_client} 个请求，"
               f"每个请求 {max(1, load_tokens // 2)}～{load_tokens} 个 token")
        print(f"同一台服务器、同一份引擎代码：'一次一个' = 引擎只用 KV 缓存的 1 行；'连续批处理' = 最多 "
              f"{srv.engine.cache.batch} 行。KV 缓存预分配 {srv.engine.cache.nbytes_allocated() / 2**20:.0f} MB。")
        load = load_test(run, key, clients, per_client, load_tokens, args.seed)
        prompt_tokens = srv.metrics.registry.get_sample_value("llm_prompt_tokens_total")
        load["prefix_cached_tokens"], load["prompt_tokens"] = srv.engine.prefix_hits, prompt_tokens
        if srv.engine.prefix:
            print(f"前缀缓存：本次 {prompt_tokens:.0f} 个提示词 token 里有 {srv.engine.prefix_hits} 个"
                  f"（{srv.engine.prefix_hits / prompt_tokens:.0%}，开头的默认系统提示词）直接复制了缓存好的 K/V，不用重新预填充。")
    weight_mb = sum(p.numel() * p.element_size() for p in srv.lm.model.parameters()) / 1e6 if args.dtype == "fp32" else None
    findings = report(load, weight_mb, args.dtype)
    plot(load, args.out_dir / "serve_load.png")
    path = save_results(args.out_dir, {
        "tour": facts, "load": load, **findings, "settings": {
            "clients": clients, "requests_per_client": per_client, "load_tokens": load_tokens, "dtype": args.dtype,
            "max_batch": args.max_batch, "threads": torch.get_num_threads()},
        "loadavg": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1)})
    print(f"结果已保存：{path}（机器负载 {os.getloadavg()[0]:.2f}；别的程序占用 CPU 时数字会偏低）")
    return 0


# ================================================================ 第 5 部分：命令行
def port_type(text: str) -> int:
    import argparse

    from common.cli import positive_int
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"端口需要在 1～65535 之间（收到 {value}）")
    return value


def build_parser():
    from common.cli import add_max_new_tokens, course_parser, existing_file, int_list, non_negative_int, positive_int

    p = course_parser(NAME, __doc__, groups=("local",))
    s = p.add_argument_group("服务器")
    s.add_argument("--host", default="127.0.0.1", help="监听地址（0.0.0.0 = 对外开放，务必配置认证）")
    s.add_argument("--port", type=port_type, default=8000, help="监听端口")
    s.add_argument("--checkpoint", type=existing_file, default=None,
                   help="改为服务第 04 课训练的小 GPT，例如 outputs/04_tiny_gpt/small/ckpt_best.pt（它只会续写英文莎士比亚）")
    s.add_argument("--api-keys", default=None, help="逗号分隔的 API key（默认读 LLM_API_KEYS；更推荐用环境变量，命令行会被 ps 看到）")
    s.add_argument("--rate-limit-rpm", type=non_negative_int, default=None,
                   help="每个 key/用户每分钟最多几个请求，0 = 不限（默认读 LLM_RATE_LIMIT_RPM，否则 0）")
    s.add_argument("--session-db", default=None, help="会话 SQLite 文件（默认读 LLM_SESSION_DB，否则 <out-dir>/sessions.sqlite3）")
    s.add_argument("--max-batch", type=positive_int, default=16, help="最多几个序列同时生成（KV 缓存的行数）")
    s.add_argument("--max-context", type=positive_int, default=1024, help="每个请求的提示词 + 生成 token 上限")
    s.add_argument("--prefill-chunk", type=positive_int, default=64, help="长提示词每步最多预填充多少 token（分块预填充）")
    s.add_argument("--max-queue", type=positive_int, default=64, help="等待队列上限，满了回 503")
    s.add_argument("--no-prefix-cache", action="store_true", help="关掉前缀缓存（默认系统提示词的 K/V 只算一次）")
    add_max_new_tokens(p, 256, "请求没写 max_tokens 时最多生成多少个新 token")
    d = p.add_argument_group("演示与压测（--demo）")
    d.add_argument("--demo", action="store_true", help="运行本课演示：进程内启动服务器，用 openai SDK 当客户端，最后压测")
    d.add_argument("--clients", type=int_list, default=None, help="压测的并发客户端数（默认 1,2,4,8,16；--quick 为 1,4）")
    d.add_argument("--requests-per-client", type=positive_int, default=None, help="每个客户端连续发几个请求（默认 2；--quick 为 1）")
    d.add_argument("--load-tokens", type=positive_int, default=None,
                   help="压测中每个请求最多生成的 token 数（实际长度在它的一半到它之间随机，默认 32；--quick 为 8）")
    return p


def main() -> int | None:
    from common.cli import setup_run

    args = build_parser().parse_args()
    args.torch_device = setup_run(args)
    if not args.demo:
        serve_forever(args)
        return None
    if args.checkpoint:
        raise UserError("--demo 的演示和压测用本地 SmolLM2；--checkpoint 只用于启动服务器（去掉 --demo 再运行）。")
    return demo(args)


if __name__ == "__main__":
    run_cli(main)
