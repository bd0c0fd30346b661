"""Lesson 06's server next to llama.cpp's own server (or any OpenAI-compatible server), same load, one run.

The load is the one in issue 40: the official `openai` SDK, streaming, temperature 0, every request capped
at --max-tokens (48) with ignore_eos, --requests-per-client (2) requests one after another per client,
--clients (1, 8, 16) clients at once. Throughput = completion tokens counted from each stream's `usage`
chunk / wall time from the first request to the last token. Every server gets exactly the same requests.

The reference server is either one you started yourself (--url), e.g.

    llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf --host 127.0.0.1 --port 8080 -np 16 -c 16384 -t 2
    python benchmarks/vs_llamacpp.py --url http://127.0.0.1:8080/v1

or Ollama (--url http://127.0.0.1:11434/v1 --model smollm2:135m), or one this script starts and stops:

    python benchmarks/vs_llamacpp.py --llama-server /path/to/build/bin/llama-server [--gguf FILE]

(-np 16 -c 16384 -t <threads> --host 127.0.0.1; --gguf defaults to the course's SmolLM2 file). Then lesson 06 is
started as a subprocess (`06_serve.py --dtype fp32`, then `--dtype int8`, same GGUF, same threads), one
configuration at a time: only one server is ever loaded with requests. Prints the table with ratios vs the
reference, the machine, threads and load average; saves outputs/benchmarks/vs_llamacpp.json.

Run it on a quiet machine (the numbers move ±20 % between runs on a shared 2-core VM: compare within one run).
This script never imports a lesson; it talks to every server over HTTP only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.cli import int_list  # noqa: E402
from common.loadtest import PROMPTS, one_client, percentile  # noqa: E402  (HTTP clients only: no torch)


SERVER_ENV = {"LLM_API_KEYS", "LLM_USERS", "LLM_RATE_LIMIT_RPM", "LLM_SESSION_DB", "LLM_JWT_SECRET", "LLM_LOCAL_MODEL",
              "LLM_COURSE_DTYPE", "LLM_COURSE_THREADS", "LLM_COURSE_DEVICE"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def first_model(base_url: str, key: str) -> str:
    import openai

    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30).models.list().data[0].id


def wait_until_serving(base_url: str, key: str, proc: subprocess.Popen | None, timeout: float) -> str:
    """Poll until the server lists a model and answers a 2-token request (a loading server answers 503)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            model = first_model(base_url, key)
            one_client(base_url, key, model, [(PROMPTS[0], 2)])          # warm-up: first calls pick kernels
            return model
        except Exception as e:  # noqa: BLE001  (not up yet: connection refused, 503 while loading)
            last = e
            time.sleep(0.5)
    raise RuntimeError(f"server at {base_url} not ready after {timeout:.0f} s: {last}")


def plans(n_clients: int, per_client: int, max_tokens: int) -> list[list[tuple[str, int]]]:
    """The same requests for every server: client c's r-th prompt is fixed, every request wants max_tokens."""
    return [[(PROMPTS[(c * per_client + r) % len(PROMPTS)], max_tokens) for r in range(per_client)]
            for c in range(n_clients)]


def run_load(base_url: str, key: str, model: str, clients: list[int], per_client: int, max_tokens: int) -> list[dict]:
    rows = []
    for n in clients:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            per = list(pool.map(lambda plan: one_client(base_url, key, model, plan), plans(n, per_client, max_tokens)))
        seconds = time.perf_counter() - t0
        records = [r for rs in per for r in rs]
        tokens = sum(r["tokens"] for r in records)
        gaps = [g for r in records for g in r["gaps"]]
        rows.append({"clients": n, "requests": len(records), "tokens": tokens, "seconds": round(seconds, 3),
                     "tok_s": round(tokens / seconds, 2),
                     "ttft_p50_ms": round(percentile([r["ttft"] for r in records], 50) * 1000, 1),
                     "tpot_p50_ms": round(percentile(gaps, 50) * 1000, 2)})
        print(f"  {n:>3} clients: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s", flush=True)
    return rows


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)          # both servers shut down cleanly on Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_started(name: str, cmd: list[str], env: dict, key: str, args, log: Path) -> dict:
    """Start one server, wait until it serves, run the load, stop it."""
    port = int(cmd[cmd.index("--port") + 1])
    base_url = f"http://127.0.0.1:{port}/v1"
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            model = wait_until_serving(base_url, key, proc, args.ready_timeout)
            before = loadavg()
            rows = run_load(base_url, key, model, args.clients, args.requests_per_client, args.max_tokens)
        except Exception:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            stop(proc)
    return {"name": name, "command": cmd, "model": model, "loadavg_before": before, "rows": rows}


def measure_url(name: str, base_url: str, key: str, model: str | None, args) -> dict:
    print(f"[{name}] {base_url}", flush=True)
    model = model or wait_until_serving(base_url, key, None, 30)     # already running: no need to wait long
    if args.model:
        one_client(base_url, key, model, [(PROMPTS[0], 2)])
    before = loadavg()
    rows = run_load(base_url, key, model, args.clients, args.requests_per_client, args.max_tokens)
    return {"name": name, "url": base_url, "model": model, "loadavg_before": before, "rows": rows}


def table(results: list[dict], clients: list[int]) -> str:
    ref = results[0] if results and results[0].get("reference") else None
    head = ["clients"] + [r["name"] for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, n in enumerate(clients):
        cells = [str(n)]
        for r in results:
            v = r["rows"][i]["tok_s"]
            cell = f"{v:.1f}"
            if ref is not None and r is not ref and ref["rows"][i]["tok_s"] > 0:
                cell += f" ({v / ref['rows'][i]['tok_s']:.2f}×)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/vs_llamacpp.py", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="base URL of a running OpenAI-compatible server (the reference), e.g. "
                                 "http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default=os.environ.get("REFERENCE_API_KEY", "none"), help="API key for --url")
    p.add_argument("--model", default=None, help="model name for --url (default: the first one /v1/models lists)")
    p.add_argument("--llama-server", type=Path, help="start this llama-server binary as the reference")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file for both servers (default: the course's SmolLM2)")
    p.add_argument("--slots", type=int, default=16, help="llama-server -np (parallel slots); lesson 06 --max-batch")
    p.add_argument("--ctx", type=int, default=16384, help="llama-server -c (total context, shared by the slots)")
    p.add_argument("--threads", type=int, default=2, help="threads for llama-server (-t) and lesson 06 (--threads)")
    p.add_argument("--dtypes", default="fp32,int8", help="lesson 06 configurations, one after the other ('' = none)")
    p.add_argument("--serve-args", default="", help="extra arguments for 06_serve.py (space-separated)")
    p.add_argument("--clients", type=int_list, default=[1, 8, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "vs_llamacpp.json")
    args = p.parse_args(argv)
    if args.url and args.llama_server:
        p.error("give --url or --llama-server, not both")
    if args.llama_server and not args.llama_server.is_file():
        p.error(f"--llama-server {args.llama_server}: no such file")
    if args.gguf and not args.gguf.is_file():
        p.error(f"--gguf {args.gguf}: no such file")
    args.dtype_list = [d for d in args.dtypes.split(",") if d.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    key = "sk-bench-" + secrets.token_hex(8)
    # the servers' behaviour comes from this script's flags, not from a developer's environment (the cache and
    # outputs locations, LLM_COURSE_CACHE / LLM_COURSE_OUTPUTS, are kept)
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV}
    env.update(LLM_API_KEYS=key, PYTHONUNBUFFERED="1")
    logs = Path(tempfile.mkdtemp(prefix="vs_llamacpp-"))
    gguf = args.gguf
    if args.llama_server and gguf is None:
        from common.model_files import find_model_file
        gguf = find_model_file()
    info = {"machine": machine(), "threads": args.threads, "loadavg_at_start": loadavg(),
            "load": {"clients": args.clients, "requests_per_client": args.requests_per_client,
                     "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}}
    print(f"machine: {info['machine']['cpu']}, {info['machine']['cpus']} CPUs; threads {args.threads}; "
          f"load average {info['loadavg_at_start']}", flush=True)
    results = []
    if args.url:
        r = measure_url("reference", args.url.rstrip("/"), args.api_key, args.model, args)
        results.append(dict(r, reference=True))
    elif args.llama_server:
        cmd = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(free_port()),
               "-np", str(args.slots), "-c", str(args.ctx), "-t", str(args.threads)]
        results.append(dict(measure_started("llama.cpp server", cmd, env, key, args, logs / "llama-server.log"),
                            reference=True))
    for dtype in args.dtype_list:
        cmd = [sys.executable, str(ROOT / "06_serve.py"), "--port", str(free_port()), "--dtype", dtype,
               "--threads", str(args.threads), "--max-batch", str(args.slots), "--out-dir", str(logs / dtype)]
        cmd += (["--model-file", str(gguf)] if gguf else []) + args.serve_args.split()
        results.append(measure_started(f"lesson 06 {dtype}", cmd, env, key, args, logs / f"06-{dtype}.log"))
    info["loadavg_at_end"] = loadavg()
    print(f"\naggregate tokens/s (from usage; {args.requests_per_client} requests/client, {args.max_tokens} tokens "
          f"each, streaming, temperature 0); ratio = vs the reference")
    print(table(results, args.clients))
    print(f"machine: {info['machine']['cpu']}, {info['machine']['cpus']} CPUs; threads {args.threads}; "
          f"load average start {info['loadavg_at_start']}, end {info['loadavg_at_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(info, results=results), indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
