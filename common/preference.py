"""偏好优化（第 08 课 DPO）和强化学习（第 09 课 GRPO）共用的三件东西：

  * ``check_answer(prompt, text)``：能用程序检查的"奖励"——简洁地回答，再以一个简短的追问结尾；
    每条规则都有自己的原因，所以能数出每条规则各挡掉了多少回答；
  * ``sequence_logprobs(model, prompts, responses)``：log p(回答 | 提示)，只对回答 token 求和，带 padding 批量算；
  * ``sample_k(model, prompts, k, ...)``：每个提示采样 k 个回答（批量生成，固定种子可复现）；
  * ``neutral_perplexity(model, tok)``：一段与偏好无关的英文的困惑度，看语言能力有没有被训坏。

两课互不导入，都从这里拿。
"""
from __future__ import annotations

import math
import re
from difflib import SequenceMatcher

import torch
import torch.nn.functional as F

from common.generate import generate_batch

MAX_WORDS = 30            # 整段回答最多 30 个词
MAX_QUESTION_WORDS = 10   # 结尾的追问最多 10 个词
ECHO_SIMILARITY = 0.7     # 追问和用户的问题（或其中一句）按词比较的相似度达到它，就算"复述"
MIN_NEW_WORDS = 2         # 追问之前的回答里，至少要有这么多个问题里没有的实词

PASS = "通过"
# 检查顺序就是下面的顺序；最后两条是防"复述问题"的规则，排在最后，
# 所以被它们判不通过的回答，恰好是"只看格式会通过"的回答——原因计数就是每条规则挡掉的通过数。
REASONS = ["空回答", "太长", "太长（没写完）", "没有以一个追问结尾", "追问太长", "只有追问，没有回答",
           "追问是在复述问题", "没有超出问题的内容"]
ECHO_RULES = REASONS[-2:]
# 中性文本：与偏好无关的普通英文段落（为本项目编写），用它的困惑度看模型的"语言能力"有没有被训坏
NEUTRAL_TEXT = (
    "The river starts high in the mountains, where snow melts every spring and feeds dozens of small streams. "
    "As it flows toward the sea, the river passes farms, forests and several old towns that grew up around its "
    "bridges. In the past, boats carried grain and timber downstream, and the towns became busy markets. "
    "Today most goods travel by road and rail, but the river is still important for fishing, farming and tourism. "
    "Every summer, visitors rent small boats, walk along the banks and watch the birds that nest in the reeds. "
    "Scientists measure the water quality each month, because the health of the river tells them a lot about the "
    "land around it. When heavy rain falls, the water level can rise quickly, so the towns have built walls and "
    "planted trees to slow the flood water down."
)
_STOP = set("a an the i you your my me we it is are am do does did to of in on for and or with how what "
            "can should would will be this that any some about best way tips tell want trying easiest advice "
            "on at from by so if i'm there".split())


def words(text: str) -> list[str]:
    """小写的词（只留字母、数字和撇号），用来比较两段话像不像。"""
    return re.findall(r"[a-z0-9']+", text.lower())


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def is_echo(question: str, prompt: str) -> bool:
    """追问算"复述用户的问题"，如果：它和用户的整句问题（或其中任何一句）按词序列比较，相似度 ≥ ECHO_SIMILARITY；
    或者它至少有 3 个实词，而且其中至少 80% 都在用户的问题里（"How do I cook rice on the stove?"）。"""
    q = words(question)
    if any(SequenceMatcher(None, q, words(s)).ratio() >= ECHO_SIMILARITY for s in [prompt, *_sentences(prompt)]
           if words(s)):
        return True
    content = [w for w in q if w not in _STOP]
    return len(content) >= 3 and len([w for w in content if w in set(words(prompt))]) >= 0.8 * len(content)


def new_content_words(body: str, prompt: str) -> list[str]:
    """回答正文里出现、而用户问题里没有的实词（去掉 how/what/the 这类虚词）。"""
    seen = set(words(prompt)) | _STOP
    return [w for w in words(body) if w not in seen]


def check_answer(prompt: str, text: str) -> tuple[bool, str]:
    """通过 = 不超过 MAX_WORDS 个词：先回答（至少一句，且说了问题之外的东西），
    再以一个（且只有一个）不超过 MAX_QUESTION_WORDS 词、不是复述用户问题的问句结尾。返回 (是否通过, 原因)。"""
    t = text.strip()
    n = len(t.split())
    if n == 0:
        return False, "空回答"
    if n > MAX_WORDS:
        return False, "太长"
    sentences = _sentences(t)
    if not t.endswith("?") or t.count("?") != 1:
        return False, "没有以一个追问结尾"
    if len(sentences[-1].split()) > MAX_QUESTION_WORDS:
        return False, "追问太长"
    if len(sentences) < 2:                  # 只问一句（"How do you do?"）不算回答
        return False, "只有追问，没有回答"
    if is_echo(sentences[-1], prompt):      # "How do I keep basil alive indoors?" 原样问回去
        return False, "追问是在复述问题"
    if len(new_content_words(" ".join(sentences[:-1]), prompt)) < MIN_NEW_WORDS:
        return False, "没有超出问题的内容"   # "You want to keep basil alive indoors. Any tips?"
    return True, PASS


def judge(tok, prompt: str, ids: list[int], max_new_tokens: int) -> tuple[bool, str, str]:
    """给一条生成的回答打分：(是否通过, 原因, 文本)。写满 max_new_tokens 还没停 = 没写完，算"太长"。"""
    text = tok.decode(ids).strip()
    if len(ids) >= max_new_tokens:
        return False, "太长（没写完）", text
    return (*check_answer(prompt, text), text)


# ---------------------------------------------------------------------------
# 序列对数概率：log p(回答 | 提示) = 回答里每个 token 的 log p 之和
# ---------------------------------------------------------------------------
def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0):
    """提示 + 回答拼起来，右侧补齐。返回 ids、attention_mask（1 = 真 token）、resp（1 = 回答 token）。"""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    resp = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        resp[i, len(p):len(p) + len(r)] = True
    return ids, mask, resp


def response_logits(model, prompts, responses):
    """回答位置上的 logits（float32）、目标 token、以及每个位置属于第几行。

    位置 t 的输出预测第 t+1 个 token，所以"回答 token"的预测来自它前一个位置。
    词表投影（576 → 49152）只在回答位置上算，提示和 padding 的位置跳过。
    """
    dev = model.device
    ids, mask, resp = (x.to(dev) for x in pad_batch(prompts, responses))
    h = model(ids[:, :-1], attention_mask=mask[:, :-1], return_hidden=True)   # [B, T-1, 576]
    keep = resp[:, 1:]                                                         # 被预测的是回答 token
    logits = model.lm_head(h[keep]).float()                                    # [回答 token 总数, vocab]
    rows = torch.arange(ids.shape[0], device=dev)[:, None].expand_as(keep)[keep]
    return logits, ids[:, 1:][keep], rows


def sequence_logprobs(model, prompts, responses) -> torch.Tensor:
    """每行一个数：sum_t log p(回答第 t 个 token | 提示 + 回答前 t-1 个 token)。"""
    logits, targets, rows = response_logits(model, prompts, responses)
    lp = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    return torch.zeros(len(prompts), device=lp.device).index_add(0, rows, lp)


@torch.no_grad()
def neutral_perplexity(model, tok) -> float:
    """一段和偏好无关的普通英文的困惑度：它变大 = 模型的"语言能力"被训坏了。"""
    ids = torch.tensor([tok.encode(NEUTRAL_TEXT)], device=model.device)
    h = model(ids[:, :-1], return_hidden=True)
    return math.exp(F.cross_entropy(model.lm_head(h[0]).float(), ids[0, 1:]).item())


# ---------------------------------------------------------------------------
# 每个提示采样 k 个回答
# ---------------------------------------------------------------------------
def sample_k(model, prompts: list[list[int]], k: int, max_new_tokens: int, *, temperature: float, seed: int,
             stop_ids=(), batch: int = 64, top_p: float = 1.0) -> list[list[list[int]]]:
    """返回 out[i][j] = 第 i 个提示的第 j 个回答（token id，不含停止符）。

    k 份提示排成一行一行一起生成（每 batch 行一批）；第 r 行用种子 seed + r，
    所以结果和 batch 的大小无关，同一个种子总得到同样的回答。
    """
    rows = [p for p in prompts for _ in range(k)]
    outs: list[list[int]] = []
    for s in range(0, len(rows), batch):
        outs += generate_batch(model, rows[s:s + batch], max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed + s, stop_ids=stop_ids)
    return [outs[i * k:(i + 1) * k] for i in range(len(prompts))]
