"""第 11 课（MoE）的辅助部分：真模型的公开配置与参数计算、字符分类、时间剖析、画图。
MoE 层本身（路由、分发、合并、均衡）写在 11_moe.py 里。

真模型的配置抄自各自在 Hugging Face 上公开的 config.json（字段名照抄），参数量按结构逐项算出来，
再和论文 / 模型卡公布的数字（reported_*）并排：两者对上，说明"总参数 / 激活参数"是怎么来的。
  Mixtral-8x7B：Mistral AI, "Mixtral of Experts", arXiv:2401.04088（47B 总参数，每个 token 用 13B）
  DeepSeek-V2：DeepSeek-AI, arXiv:2405.04434（236B 总参数，每个 token 激活 21B）
  DeepSeek-V3：DeepSeek-AI, arXiv:2412.19437（671B 总参数，激活 37B；另有 14B 的 MTP 模块不计）
  Qwen1.5-MoE-A2.7B：Qwen 团队模型卡（14.3B 总参数，激活 2.7B）
  Qwen3-30B-A3B：Qwen 团队模型卡（30.5B 总参数，激活 3.3B）
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- published configs
PUBLISHED = {
    "Mixtral-8x7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         reported_total=46.7e9, reported_active=12.9e9),
    "DeepSeek-V2": dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                        num_hidden_layers=60, num_attention_heads=128, n_routed_experts=160, n_shared_experts=2,
                        num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        reported_total=236e9, reported_active=21e9),
    "DeepSeek-V3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, n_routed_experts=256, n_shared_experts=1,
                        num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        reported_total=671e9, reported_active=37e9),
    "Qwen1.5-MoE-A2.7B": dict(vocab_size=151936, hidden_size=2048, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, qkv_bias=True,
                              reported_total=14.3e9, reported_active=2.7e9),
    "Qwen3-30B-A3B": dict(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, qk_norm=True, reported_total=30.5e9, reported_active=3.3e9),
}


def attention_params(c: dict) -> int:
    """One layer's attention: MLA (DeepSeek: low-rank q and compressed kv) or ordinary GQA."""
    h, nh = c["hidden_size"], c["num_attention_heads"]
    if "kv_lora_rank" in c:
        qr, kvr, nope, rope, v = (c[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                 "qk_rope_head_dim", "v_head_dim"))
        return (h * qr + qr + qr * nh * (nope + rope)            # q: down, norm, up
                + h * (kvr + rope) + kvr + kvr * nh * (nope + v)  # kv: down (+ shared rope key), norm, up
                + nh * v * h)                                     # output
    hd = c.get("head_dim", h // nh)
    nkv = c["num_key_value_heads"]
    qkv = h * (nh + 2 * nkv) * hd + ((nh + 2 * nkv) * hd if c.get("qkv_bias") else 0)
    return qkv + nh * hd * h + (2 * hd if c.get("qk_norm") else 0)


def param_counts(c: dict) -> dict:
    """(total, active) from a config: embeddings (input and untied output), attention, norms, router, experts.
    A gated MLP (SwiGLU) has 3 matrices: 3·hidden·intermediate."""
    h, L = c["hidden_size"], c["num_hidden_layers"]
    E = c.get("num_local_experts") or c.get("n_routed_experts") or c["num_experts"]
    k = c["num_experts_per_tok"]
    expert = 3 * h * c.get("moe_intermediate_size", c.get("intermediate_size"))
    shared = 3 * h * (c.get("shared_expert_intermediate_size") or c.get("n_shared_experts", 0) * c.get("moe_intermediate_size", 0))
    gate = h * E + (h if c.get("shared_expert_intermediate_size") else 0)   # router (+ Qwen1.5's shared-expert gate)
    dense_layers = c.get("first_k_dense_replace", 0)                       # DeepSeek: the first layers stay dense
    per_layer = attention_params(c) + 2 * h
    total = 2 * c["vocab_size"] * h + h + L * per_layer
    total += dense_layers * 3 * h * c.get("intermediate_size", 0) + (L - dense_layers) * (E * expert + shared + gate)
    active = total - (L - dense_layers) * (E - k) * expert
    return dict(total=total, active=active, experts=E, top_k=k, shared=c.get("n_shared_experts",
                1 if c.get("shared_expert_intermediate_size") else 0))


def fmt(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def published_table() -> list[dict]:
    rows = []
    for name, c in PUBLISHED.items():
        p = param_counts(c)
        rows.append(dict(name=name, total=f"{fmt(p['total'])}（{fmt(c['reported_total'])}）",
                         active=f"{fmt(p['active'])}（{fmt(c['reported_active'])}）", active_frac=p["active"] / p["total"],
                         experts=p["experts"], shared=p["shared"], top_k=p["top_k"], total_n=p["total"],
                         active_n=p["active"]))
    return rows


def model_table(res: dict, name: str = "本课的 MoE") -> dict:
    t, a = res["params_total"], res["params_active"]
    return dict(name=name, total=fmt(t), active=fmt(a), active_frac=a / t, experts=res.get("experts", "-"),
                shared=res.get("shared", "-"), top_k=res.get("top_k", "-"), total_n=t, active_n=a)


# ----------------------------------------------------------------------------- character classes
CHAR_CLASSES = ["空格", "换行", "元音", "辅音", "大写", "标点", "其他"]


def char_class(ch: str) -> int:
    if ch == " ":
        return 0
    if ch == "\n":
        return 1
    if ch in "aeiou":
        return 2
    if ch.islower():
        return 3
    if ch.isupper():
        return 4
    return 5 if ch in ".,;:!?'\"-()[]&" else 6


def char_class_matrix(chars, top1: torch.Tensor, n_experts: int) -> list[list[float]]:
    """[class][expert]: of the tokens that read a character of this class, the share whose first choice is expert e."""
    cls = torch.tensor([char_class(c) for c in chars])
    m = torch.zeros(len(CHAR_CLASSES), n_experts)
    m.index_put_((cls, top1.cpu()), torch.ones(len(cls)), accumulate=True)
    return (m / m.sum(1, keepdim=True).clamp(min=1)).tolist()


# ----------------------------------------------------------------------------- where the time goes
TIMES: dict | None = None   # label -> seconds, collected only while profile_forward runs


@contextlib.contextmanager
def timed(label: str):
    """Adds the block's wall time to TIMES[label] while profiling (on CPU every op finishes before it returns);
    a no-op otherwise."""
    if TIMES is None:
        yield
        return
    t0 = time.perf_counter()
    yield
    TIMES[label] = TIMES.get(label, 0.0) + time.perf_counter() - t0


def profile_forward(model, x, repeats: int = 3) -> dict:
    """Milliseconds per forward pass: "forward" (the whole pass) and each timed() label inside it."""
    global TIMES
    model.eval()
    with torch.no_grad():
        model(x)                                              # warm-up
        TIMES = {}
        try:
            for _ in range(repeats):
                with timed("forward"):
                    model(x)
            out = {k: v * 1000 / repeats for k, v in TIMES.items()}
        finally:
            TIMES = None
    model.train()
    return out


# ----------------------------------------------------------------------------- plots
LABELS_EN = {"dense": "dense (lesson 04 speedrun)", "moe": "MoE, same active params (bias balancing)",
             "dense_big": "dense, same total params as MoE", "moe_aux": "MoE, balancing loss",
             "moe_none": "MoE, no balancing"}
SHORT_EN = {"moe_none": "no balancing", "moe_aux": "balancing loss", "moe": "bias balancing"}
COLORS = {"dense": "tab:blue", "moe": "tab:orange", "dense_big": "tab:green", "moe_aux": "tab:purple",
          "moe_none": "tab:red"}


def plot_curves(res: dict, path: Path) -> Path:
    """Left: validation loss vs training seconds (equal time). Middle: vs steps (equal steps). Right: the final
    validation loss at equal steps, on a zoomed axis (the differences are a few hundredths). Same colours."""
    from common.plots import new_figure

    fig, (a1, a2, a3) = new_figure(ncols=3, size=(16, 4.2))
    for name, r in res["equal_time"].items():
        a1.plot([c["seconds"] for c in r["curve"]], [c["val"] for c in r["curve"]], "o-", c=COLORS[name])
    for name, r in res["equal_steps"].items():
        a2.plot([c["step"] for c in r["curve"]], [c["val"] for c in r["curve"]], "o-", c=COLORS[name],
                label=f"{name}: {LABELS_EN[name]}")
    finals = {n: r["val_loss"] for n, r in res["equal_steps"].items()}
    a3.barh(list(finals), list(finals.values()), color=[COLORS[n] for n in finals])
    lo, hi = min(finals.values()), max(finals.values())
    a3.set_xlim(lo - 0.5 * (hi - lo) - 0.01, hi + 0.5 * (hi - lo) + 0.01)
    a3.invert_yaxis()
    lows = [c["val"] for part in ("equal_time", "equal_steps") for r in res[part].values() for c in r["curve"]]
    for ax in (a1, a2):
        ax.set_ylim(min(lows) - 0.05, min(lows) + 1.0)      # the start (~4.4) is off the top: zoom on the end
        ax.grid(alpha=0.3)
    a1.set(xlabel="training seconds (evaluation excluded)", ylabel="validation loss (zoomed)", title="equal wall-clock time")
    a2.set(xlabel="training step", ylabel="validation loss (zoomed)", title="equal steps")
    a3.set(xlabel="final validation loss (zoomed)", title="equal steps: final")
    a3.grid(alpha=0.3, axis="x")
    fig.legend(*a2.get_legend_handles_labels(), loc="lower center", ncol=3, frameon=False)   # below all panels
    fig.subplots_adjust(bottom=0.3)
    return _save_plain(fig, path)


def plot_loads(res: dict, path: Path) -> Path:
    """One row per balancing method, one column per layer: each expert's load (share / uniform share) over training."""
    from common.plots import new_figure

    names = list(res)
    L = len(res[names[0]]["load"]["history"])
    fig, axes = new_figure(ncols=L, nrows=len(names), size=(3.2 * L + 1.2, 2.4 * len(names)))
    im = None
    for i, name in enumerate(names):
        for l in range(L):
            ax = axes[i][l]
            h = torch.tensor(res[name]["load"]["history"][l])          # [E, time bins]
            E = h.shape[0]
            im = ax.imshow(h * E, aspect="auto", cmap="viridis", vmin=0, vmax=3, interpolation="nearest",
                           extent=(0, 100, E - 0.5, -0.5))
            ax.set_title(f"{name} ({SHORT_EN[name]}), layer {l + 1}", fontsize=9)
            ax.set_xlabel("training progress (%)" if i == len(names) - 1 else "")
            ax.set_ylabel("expert" if l == 0 else "")
    fig.subplots_adjust(hspace=0.45, wspace=0.25, right=0.86)
    fig.colorbar(im, ax=axes, label="expert load / uniform load (1 = balanced)", shrink=0.8)
    return _save_plain(fig, path)


def _save_plain(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_specialization(mats: list, path: Path) -> Path:
    """One panel per layer: rows = character class of the token read, columns = experts, colour = share."""
    from common.plots import new_figure

    en = ["space", "newline", "vowel", "consonant", "capital", "punct.", "other"]
    fig, axes = new_figure(ncols=len(mats), size=(3.4 * len(mats) + 1.2, 3.4))
    im = None
    for l, (ax, m) in enumerate(zip(axes, mats)):
        im = ax.imshow(torch.tensor(m), aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set(xlabel="expert (first choice)", title=f"layer {l + 1}")
        ax.set_yticks(range(len(en)), en if l == 0 else [""] * len(en))
        ax.set_xticks(range(len(m[0])))
    axes[0].set_ylabel("character read")
    fig.colorbar(im, ax=axes, label="share of this class", shrink=0.8)
    return _save_plain(fig, path)
