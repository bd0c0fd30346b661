"""Benchmark: how many real-world JSON Schemas common/json_schema.py accepts, and why it refuses the rest.

Point it at a directory of subsets, one folder of *.json schema files each, e.g. JSONSchemaBench
(github.com/guidance-ai/jsonschemabench, its data/ folder: Glaiveai2K = function-calling schemas,
Github_easy/medium/hard, Kubernetes, Snowplow, WashingtonPost, JsonSchemaStore). The corpus is downloaded
data and is not part of this repository.

    python benchmarks/schema_coverage.py --corpus /path/to/jsonschemabench/data [--limit 500]

For every schema it only compiles the grammar (no model, no tokenizer): accepted = compile_schema() returns,
refused = it raises the one-line UserError (the keyword and its location). Prints the acceptance rate per
subset and the most frequent refusal reasons (keyword + reason, location dropped); writes
outputs/benchmarks/schema_coverage.json. No schema is special-cased.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.cli import positive_int  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.outputs import output_dir  # noqa: E402

FUNCTION_CALLING = {"Glaiveai2K"}
SECONDS_PER_SCHEMA = 10


class CompileTimeout(Exception):
    pass


def reason_of(message: str) -> str:
    """The refusal message without its location, so that equal reasons group together."""
    m = re.search(r"关键字 '([^']+)'（位置 [^）]*）(?:：(.*))?", message)
    if not m:
        return re.sub(r"\$[^ ，：）]*", "$…", message)[:90]
    why = re.sub(r"收到 .*|正则 .*?：", "", m.group(2) or "").rstrip("。 ，")
    return f"{m.group(1)}: {why}"[:90]


def try_compile(path: Path) -> str | None:
    """None if accepted, otherwise the refusal reason."""
    from common.json_schema import compile_schema

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "not JSON"
    signal.alarm(SECONDS_PER_SCHEMA)
    try:
        compile_schema(schema)
        return None
    except UserError as e:
        return reason_of(str(e))
    except CompileTimeout:
        return f"compile took over {SECONDS_PER_SCHEMA} s"
    except RecursionError:
        return "RecursionError"
    finally:
        signal.alarm(0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="share of real-world JSON Schemas the lesson-07 grammar accepts")
    p.add_argument("--corpus", type=Path, required=True, help="folder with one sub-folder of *.json schemas per subset")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many schemas per subset")
    p.add_argument("--top", type=positive_int, default=15, help="how many refusal reasons to list")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.corpus.is_dir():
        raise UserError(f"--corpus {args.corpus} 不是一个文件夹。")
    subsets = sorted(d for d in args.corpus.iterdir() if d.is_dir() and any(d.glob("*.json")))
    if not subsets:
        raise UserError(f"{args.corpus} 下面没有含 *.json 的子文件夹。")

    def on_alarm(*_):
        raise CompileTimeout()
    signal.signal(signal.SIGALRM, on_alarm)
    results, reasons = {}, collections.Counter()
    t0 = time.perf_counter()
    print(f"{'subset':18} {'schemas':>7} {'accepted':>8} {'rate':>7}")
    for d in subsets:
        files = sorted(d.glob("*.json"))[:args.limit]
        refused = collections.Counter()
        for f in files:
            r = try_compile(f)
            if r is not None:
                refused[r] += 1
        ok = len(files) - sum(refused.values())
        results[d.name] = {"schemas": len(files), "accepted": ok, "rate": ok / len(files),
                           "top_reasons": refused.most_common(args.top)}
        reasons.update(refused)
        print(f"{d.name:18} {len(files):7} {ok:8} {ok / len(files):7.1%}", flush=True)
    fc = [r for n, r in results.items() if n in FUNCTION_CALLING]
    other = [r for n, r in results.items() if n not in FUNCTION_CALLING]
    summary = {}
    for label, rows in (("function_calling", fc), ("general", other)):
        if rows:
            n, ok = sum(r["schemas"] for r in rows), sum(r["accepted"] for r in rows)
            summary[label] = {"schemas": n, "accepted": ok, "rate": ok / n}
            print(f"{label:18} {n:7} {ok:8} {ok / n:7.1%}")
    print(f"\ntop refusal reasons ({time.perf_counter() - t0:.0f} s):")
    for reason, n in reasons.most_common(args.top):
        print(f"  {n:5}  {reason}")
    out = output_dir("benchmarks") / "schema_coverage.json"
    out.write_text(json.dumps({"corpus": str(args.corpus), "subsets": results, "summary": summary,
                               "top_reasons": reasons.most_common(args.top)}, ensure_ascii=False, indent=2),
                   encoding="utf-8")
    print(f"written: {out}")


if __name__ == "__main__":
    run_cli(main)
