"""第 6 课：像生产环境一样部署模型——OpenAI 兼容 API、认证、限流、监控，以及实测"连续批处理"。

你将学到：
  1. 引擎（本课的核心）：一个调度线程独占模型；新请求在"下一步"就加入正在运行的批次
     （continuous batching），每一步只做一次批量前向：新来者的提示词预填充 + 其他序列各解码一个
     token；每个序列在 KV 缓存里有自己的一行（slot），结束的序列立刻退出、把位置让出来；带 response_format /
     tools 的行还有自己的掩码（第 7 课的 JSON 语法），只能写出合法的 JSON / 工具调用。
  2. 服务器：FastAPI + uvicorn（vLLM / SGLang 的 OpenAI 服务器也用它们），OpenAI 兼容的 /v1/models、
     /v1/chat/completions（SSE 流式 / 非流式，response_format、tools）、/v1/embeddings，/healthz、/readyz、/metrics
     （Prometheus），/v1/generate 与 SQLite 会话，API key / OAuth2 + JWT 认证，限流（429）；
     以及我们攻击自己的服务器后补上的防线（docs/06 第 7 节）：先认证再读请求体、请求体上限、
     一个请求出错不拖垮引擎、客户端断开立刻释放、关闭时告诉被中断的流。
  3. 压测（--demo）：1、2、4、8、16 个并发流式客户端，对比"一次只服务一个请求"和连续批处理的
     总吞吐、首 token 延迟（TTFT）p50/p95、每 token 延迟 p50/p95——并用实测数字解释
     为什么批处理在"读内存受限"的解码阶段能成倍提高吞吐，又付出了什么延迟代价。
     客户端、压测和报告在 common/loadtest.py（本课和 benchmarks/serve_load.py 共用）；
     认证、限流、会话、指标和 HTTP 外围零件在 common/serving.py。

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

import argparse
import asyncio
import collections
import concurrent.futures
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from common import loadtest, structured_serving as structured
from common.cli import (add_knob, add_max_new_tokens, course_parser, existing_file, int_list, non_negative_int,
                        positive_int, setup_run)
from common.errors import UserError, run_cli
from common.sampling import sample_next_token
# 认证、限流、会话、指标、请求体定义（ChatRequest 等）、把 token 变成文字片段的 Reply 和 HTTP 外围零件（SSE、错误格式、
# /healthz /readyz /metrics /oauth/token……）在 common/serving.py；response_format / tools 的解析和回答形状在
# common/structured_serving.py（约束用第 7 课的 common/json_schema.py）。本课讲引擎（第 1 部分）和 OpenAI 兼容的路由（第 2 部分）。
from common.serving import (CHAT_ACCEPTED, ApiError, Auth, ChatRequest, EmbeddingRequest, GenerateRequest, Metrics,
                            RateLimiter, Reply, Sessions, auth_banner, bind, embeddings_body, healthz,
                            install_plumbing, make_uvicorn, oauth_token, port_number, prometheus_metrics, readyz,
                            reject_unsupported, settings_from_env, shutdown_fate)

NAME = "06_serve"
MODEL_IDS = {"smollm2": "smollm2-135m-instruct", "qwen0.5b": "qwen2.5-coder-0.5b-instruct"}  # /v1/models 里的名字
EMBEDDING_MODEL = "text-embedding-all-minilm-l6-v2"     # /v1/embeddings：课程的 all-MiniLM-L6-v2（第 03 课）
STATIC_DIR = Path(__file__).resolve().parent / "static"   # 聊天页：GET / 和 /static/*


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
    cancelled: str | None = None   # 取消的原因（"cancelled" = 客户端断开，"shutdown" = 服务器关闭）
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_last: float = 0.0
    gen: torch.Generator | None = None
    constraint: object | None = None   # 结构化输出：这一行自己的掩码状态（common/structured_serving.py 的 RowConstraint）


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
        self.calls: collections.deque = collections.deque()   # 在引擎线程里、两步之间执行的函数（如 embeddings）
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
        self.cache.load_prefix(slot, ks, vs)          # 缓存自己填这一行（K/V、长度、位置）
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

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """客户端断开（或服务器关闭）：下一步开始时这个序列就退出，位置立刻让给别人。"""
        job.cancelled = reason
        with self.cv:
            self.cv.notify()

    def cancel_all(self, reason: str) -> int:
        """取消所有运行中和等待中的请求（服务器关闭前），返回取消了几个。"""
        with self.cv:
            jobs = [j for j in self.slots if j] + list(self.waiting)
            for job in jobs:
                job.cancelled = reason
            self.cv.notify()
        return len(jobs)

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """让 fn() 在引擎线程里、两步之间执行（所有 torch 运算都留在这一个线程，见 start() 的注释）。"""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cv:
            self.calls.append((fn, fut))
            self.cv.notify()
        return fut

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def busy(self) -> tuple[int, int]:
        return len(self.waiting), sum(j is not None for j in self.slots)

    def set_limit(self, n: int) -> None:
        """最多同时运行几个序列（1 = 一次只服务一个请求）：压测用同一份引擎代码对比两种模式。"""
        with self.cv:
            self.limit = max(1, min(n, self.cache.batch))
            self.cv.notify()

    def reset_stats(self) -> None:
        """计时统计清零（压测每一轮开始前）。"""
        self.step_stats.clear()
        self.prefill_stats = [0, 0.0]

    def stats(self) -> dict:
        """计时统计的只读副本：{"decode": {批大小: (步数, 秒)}, "prefill": (步数, 秒)}（纯解码步按批大小分）。"""
        return {"decode": {b: tuple(v) for b, v in sorted(self.step_stats.items())},
                "prefill": tuple(self.prefill_stats)}

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
            try:
                with self.cv:
                    self._admit()
                    while self.running and not any(self.slots) and not self.calls:
                        self.cv.wait()
                        self._admit()
                    if not self.running:
                        return
                self._run_calls()
                if any(self.slots):
                    self.step()
            except Exception:                 # 出了任何错：结束当前这些请求，引擎继续服务后来的
                traceback.print_exc()
                for job in [j for j in self.slots if j]:
                    self._finish(job, "error")

    def _run_calls(self) -> None:
        while self.calls:
            fn, fut = self.calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:        # 错误交给等结果的那一方
                    fut.set_exception(e)

    def _admit(self) -> None:
        """等待中的请求占据空闲的行（最小的空行号，让运行中的行尽量挤在前面）。"""
        for job in self.slots:
            if job is not None and job.cancelled:
                self._finish(job, job.cancelled)
        while self.waiting and self.waiting[0].cancelled:
            job = self.waiting.popleft()
            self._finish(job, job.cancelled)
        for slot in range(self.limit):
            if not self.waiting:
                break
            if self.slots[slot] is None:
                job = self.waiting.popleft()
                try:                          # 单个请求出错（例如种子不合法）只让这一个请求失败
                    job.slot, job.fed, job.generated = slot, 0, []
                    job.gen = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
                    self.cache.reset_rows([slot])             # 这一行从空开始
                    self._reuse_prefix(job, slot)
                    self.slots[slot] = job
                except Exception:
                    traceback.print_exc()
                    job.slot = -1
                    self._finish(job, "error")
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(*self.busy())

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
        for r, job in enumerate(self.slots[:n]):       # 结构化输出：带约束的行只留下能让 JSON 继续合法的 token
            if job is not None and job.constraint is not None:            # （每行自己的掩码，别的行不受影响）
                job.constraint.mask_(logits[r])
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
        if tok in job.stop_ids:                  # 带约束的行：结束原因由约束给出（写完的工具调用是 "tool_calls"）
            self._finish(job, job.constraint.end_reason() if job.constraint else "stop")
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
        if job.constraint is not None and job.constraint.advance(tok):   # JSON 已完整、后面只能结束：立刻结束
            self._finish(job, job.constraint.end_reason())
        elif len(job.generated) >= job.max_new_tokens:
            self._finish(job, "length")                                  # 预算用完：没写完，绝不说成完整

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
class Server:
    """服务器的全部状态：模型 + 引擎、认证、限流、会话库、指标。"""

    def __init__(self, *, auth: Auth, rate_limit_rpm: int, session_db, max_batch: int, max_context: int,
                 prefill_chunk: int, max_queue: int, default_max_tokens: int, load_model: Callable,
                 prefix_cache: bool = True, max_body: int = 1 << 20):
        self.auth, self.limiter, self.metrics = auth, RateLimiter(rate_limit_rpm), Metrics()
        self.session_db, self.sessions = session_db, None
        self.engine_args = dict(max_batch=max_batch, max_len=max_context, prefill_chunk=prefill_chunk,
                                max_queue=max_queue)
        self.max_context, self.default_max_tokens = max_context, default_max_tokens
        self.load_model, self.lm, self.engine, self.prefix_cache = load_model, None, None, prefix_cache
        self.embedder = None                       # all-MiniLM-L6-v2，第一次请求 /v1/embeddings 时在引擎线程里加载
        self.max_body = max_body                   # 请求体上限（字节），超过回 413
        self.stop_note: str | None = None          # 停止后打印的一句话（前台运行时；{requests} 填进行中请求的结局）
        self.cut, self.cut_timer = 0, None         # 关闭时被中断的请求数；到点中断它们的定时器
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

    def drain(self, grace: float) -> None:
        """服务器要关闭了（uvicorn 给进行中的请求 grace 秒）：宽限期结束前 1 秒，还在生成的请求一律中断，
        流式回答最后收到一个 server_shutdown 错误事件，而不是被一声不响地掐断。"""
        def cut():
            self.cut = self.engine.cancel_all("shutdown") if self.engine is not None else 0
        self.cut_timer = threading.Timer(max(0.0, grace - 1), cut)
        self.cut_timer.daemon = True
        self.cut_timer.start()

    def stop(self) -> None:
        if self.cut_timer is not None:
            self.cut_timer.cancel()
        if self.engine is not None:
            self.engine.stop()
        if self.sessions is not None:
            self.sessions.close()
        if self.stop_note:                           # {requests}：有几个请求在宽限期结束时被中断
            print(self.stop_note.format(requests=shutdown_fate(self.cut)), flush=True)

    def ready(self) -> bool:
        """模型已加载、引擎线程还活着（/readyz 和每个 /v1 请求都看它）。"""
        return self.lm is not None and self.engine.alive()

    async def embed(self, texts: list[str]):
        """句向量 [N, 384] 和 token 数。在引擎线程里两步之间算（所有 torch 运算都在那一个线程，见 Engine.start）。"""
        def work():
            if self.embedder is None:                # 第一次用到时才加载（约 90 MB）
                from common.embeddings import load_local_embedder
                self.embedder = load_local_embedder()
            return self.embedder.embed(texts), sum(map(len, self.embedder.tokenize(texts)))
        try:
            return await asyncio.wrap_future(self.engine.call(work))
        except UserError as e:                       # 句向量模型文件不在：这台服务器暂时给不了 embeddings
            raise ApiError(503, str(e), "server_error", "embeddings_unavailable") from None

    def not_ready_reason(self) -> str:
        return "模型还在加载" if self.lm is None else "引擎线程已停止"

    def app(self) -> FastAPI:
        return build_app(self)

    def guard(self, headers, client: str) -> str:
        """每个 /v1 请求先过这里（在读请求体之前，见 common/serving.py 的 Gatekeeper）：认证 → 限流 →
        模型是否就绪。返回调用者身份。"""
        who = self.auth.identify(headers, client)
        self.limiter.check(who)
        if not self.ready():
            raise ApiError(503, self.not_ready_reason() + "，请稍后再试（GET /readyz 返回 200 后即可）", "server_error",
                           "not_ready", {"Retry-After": "2"})
        return who

    def history(self, session: str | None, who: str) -> list[dict]:
        """这个调用者在这个会话里的历史消息（新会话、或别人的同名会话：[]）。"""
        return self.sessions.get(session, who) if session is not None else []

    def submit(self, messages: list[dict], max_new: int | None, temperature: float, top_p: float,
               seed: int | None, stops: list[str], ignore_eos: bool = False, constraint=None) -> Reply:
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
                  frozenset() if ignore_eos and constraint is None else frozenset(tok.eos_ids), constraint=constraint)
        reply = Reply(self, job, stops)
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(503, "服务器忙：等待队列已满，请稍后重试", "server_error", "queue_full",
                           {"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(len(prompt))
        return reply


def srv_of(request: Request) -> Server:
    return request.app.state.srv


async def caller(request: Request) -> str:
    """每个 /v1 路由的依赖：调用者身份（Gatekeeper 在读请求体之前已经认证、限流、检查过模型就绪）。"""
    return request.state.caller


async def list_models(request: Request, who: str = Depends(caller)):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llm-course"}
                                       for name in (srv_of(request).model_id, EMBEDDING_MODEL)]}


async def embeddings(body: EmbeddingRequest, request: Request, who: str = Depends(caller)):
    """OpenAI 兼容的句向量接口：第 03 课指向本服务器时，对话和向量都走 API。"""
    if body.model != EMBEDDING_MODEL:
        raise ApiError(404, f"没有句向量模型 {body.model!r}：本服务器只有 {EMBEDDING_MODEL}", code="model_not_found")
    reject_unsupported(body.model_extra, {"user": None, "dimensions": (384,)})
    texts = [body.input] if isinstance(body.input, str) else body.input
    vecs, tokens = await srv_of(request).embed(texts)
    return embeddings_body(vecs, tokens, EMBEDDING_MODEL, body.encoding_format)


async def chat_completions(body: ChatRequest, request: Request, who: str = Depends(caller)):
    """OpenAI 兼容的对话接口：stream=true 时按 SSE 一块一块发，最后 data: [DONE]。response_format / tools：plan 把它们
    变成这个请求自己的约束（schema 不支持时 400），引擎每步给这一行加掩码；回答是 content 或 tool_calls。"""
    srv = srv_of(request)
    if body.model != srv.model_id:
        raise ApiError(404, f"没有模型 {body.model!r}：本服务器只有 {srv.model_id}", code="model_not_found")
    reject_unsupported(body.model_extra, CHAT_ACCEPTED)
    plan = await structured.plan(body, srv.lm.tokenizer, srv.history(body.session_id, who))
    stops = [] if plan.compiled else [body.stop] if isinstance(body.stop, str) else list(body.stop or [])  # JSON 不截断
    reply = srv.submit(plan.prompt, body.max_completion_tokens or body.max_tokens,
                       1.0 if body.temperature is None else body.temperature,
                       1.0 if body.top_p is None else body.top_p, body.seed, stops, body.ignore_eos, plan.row(srv.metrics))
    head = {"id": f"chatcmpl-{reply.job.id}", "created": int(time.time()), "model": srv.model_id}

    def remember():                    # 只有完整结束的回答才写进会话
        if body.session_id and reply.finish in ("stop", "length", "tool_calls"):
            srv.sessions.append(body.session_id, who, plan.new + [{"role": "assistant", "content": reply.text}])

    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(structured.chat_events(reply, head, plan, usage, remember),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await reply.wait(request)
    remember()
    return structured.chat_body(reply, head, plan)


async def generate_text(body: GenerateRequest, request: Request, who: str = Depends(caller)):
    """原教程的 /v1/generate：不带 session_id 时新建一个会话，带上就接着聊。"""
    srv = srv_of(request)
    reject_unsupported(body.model_extra, {})
    session = body.session_id or uuid.uuid4().hex
    new = [{"role": "user", "content": body.prompt}]
    reply = srv.submit(srv.history(body.session_id, who) + new, body.max_new_tokens, body.temperature,
                       body.top_p, body.seed, [])
    await reply.wait(request)
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


async def chat_page():
    return FileResponse(STATIC_DIR / "chat.html")


def build_app(srv: Server) -> FastAPI:
    """把上面的函数挂到路径上。lifespan：启动时加载模型，所有连接结束后停引擎、关数据库。
    install_plumbing：所有错误都按 OpenAI 的格式返回，每个请求都计数（common/serving.py）。"""
    @asynccontextmanager
    async def lifespan(app):
        srv.start()
        yield
        srv.stop()

    app = FastAPI(title="LLM 零基础实践教程 · 第 6 课", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.srv = srv
    install_plumbing(app, srv.metrics, srv.guard, srv.max_body)
    for path, fn, method in [("/healthz", healthz, "GET"), ("/readyz", readyz, "GET"), ("/metrics", prometheus_metrics, "GET"),
                             ("/oauth/token", oauth_token, "POST"), ("/v1/models", list_models, "GET"),
                             ("/v1/chat/completions", chat_completions, "POST"), ("/v1/embeddings", embeddings, "POST"),
                             ("/v1/generate", generate_text, "POST"), ("/v1/sessions/{session_id}", get_session, "GET"),
                             ("/v1/sessions/{session_id}", delete_session, "DELETE")]:
        app.add_api_route(path, fn, methods=[method])
    # 聊天页（static/ 里的一个 HTML + JS + CSS，没有构建步骤）：公开路径，不在 /v1/ 下，所以不需要 key
    app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ================================================================ 第 3 部分：启动服务器
def load_model_of(args):
    """--checkpoint：第 04 课训练的小 GPT（它导出的 model.pt2 + 检查点里的权重）；否则本地 SmolLM2 / Qwen。"""
    if args.checkpoint:
        from common.exported import load_tiny_gpt
        return load_tiny_gpt(args.checkpoint)
    from common.local_model import load_local_model          # int8：q/k/v、gate/up 各合成一个矩阵乘法（见 docs/02「单条序列解码一步的时间花在哪里」）
    return load_local_model(dtype=args.dtype, device=args.torch_device, fused=args.dtype == "int8")


def make_server(args, lm=None, **overrides) -> Server:
    """认证、限流、会话库按"命令行参数 > 环境变量 > 默认值"配置（common/serving.py 的 settings_from_env）。"""
    settings = {**settings_from_env(args.api_keys, args.rate_limit_rpm, args.session_db,
                                    args.out_dir / "sessions.sqlite3"), **overrides}
    if args.checkpoint and lm is None:           # 小模型加载只要一秒：当场加载，文件有问题立刻报错退出
        lm = load_model_of(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return Server(**settings, max_batch=args.max_batch, max_context=args.max_context,
                  prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
                  default_max_tokens=args.max_new_tokens, prefix_cache=not args.no_prefix_cache,
                  max_body=args.max_body_bytes,
                  load_model=lambda: lm or load_model_of(args))


def serve_forever(args) -> None:
    """python 06_serve.py：前台运行，Ctrl-C / SIGTERM 时停止接收新请求、等进行中的流结束、关数据库。"""
    srv = make_server(args)
    print(auth_banner(srv.auth, args.host))                 # 认证开没开（没开又对外监听时警告）
    print(f"[服务] 正在启动 http://{args.host}:{args.port}/v1 （模型 {args.checkpoint or MODEL_IDS[args.local_model]}；最多 {args.max_batch} 个序列同时生成）")
    print(f"       试试：python 01_hello_llm.py --base-url http://{args.host}:{args.port}/v1    按 Ctrl-C 停止。")
    sock = bind(args.host, args.port)
    srv.stop_note = "[服务] 已停止：{requests}，引擎已停，会话数据库已关闭。"
    make_uvicorn(srv.app(), "info", args.grace, srv.drain).run(sockets=[sock])


# ================================================================ 第 4 部分：命令行
def parse_args(argv=None) -> argparse.Namespace:
    p = course_parser(NAME, __doc__, groups=("local",))
    s = p.add_argument_group("服务器")
    s.add_argument("--host", default="127.0.0.1", help="监听地址（0.0.0.0 = 对外开放，务必配置认证）")
    s.add_argument("--port", type=port_number, default=8000, help="监听端口")
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
    s.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="请求体上限（字节），超过回 413")
    s.add_argument("--grace", type=positive_int, default=30,
                   help="停止时给进行中的请求多少秒；到点还没结束的流会收到 server_shutdown 错误事件")
    add_max_new_tokens(p, 256, "请求没写 max_tokens 时最多生成多少个新 token")
    d = p.add_argument_group("演示与压测（--demo）")
    d.add_argument("--demo", action="store_true", help="运行本课演示：进程内启动服务器，用 openai SDK 当客户端，最后压测")
    add_knob(d, "--clients", type=int_list, default=[1, 2, 4, 8, 16], quick=[1, 4], help="压测的并发客户端数，逗号分隔")
    add_knob(d, "--requests-per-client", type=positive_int, default=2, quick=1, help="每个客户端连续发几个请求")
    add_knob(d, "--load-tokens", type=positive_int, default=32, quick=8,
             help="压测中每个请求最多生成的 token 数（实际长度在它的一半到它之间随机）")
    add_knob(d, "--tour-tokens", type=positive_int, default=24, quick=12, help="导览（流式回答、会话）每个回答最多生成的 token 数")
    return p.parse_args(argv)


def main(argv=None) -> int | None:
    args = parse_args(argv)
    args.torch_device = setup_run(args)
    if not args.demo:
        serve_forever(args)
        return None
    if args.checkpoint:
        raise UserError("--demo 的演示和压测用本地 SmolLM2；--checkpoint 只用于启动服务器（去掉 --demo 再运行）。")
    # 演示：进程内启动服务器（认证开启），用 common/loadtest.py 的导览和压测当客户端，最后解读并保存结果。
    # 模型由服务器自己的加载线程加载（见 Engine.start 的注释：主线程一旦跑过 torch 运算，引擎线程就会变慢）。
    return loadtest.demo(args, make_server)


if __name__ == "__main__":
    run_cli(main)
