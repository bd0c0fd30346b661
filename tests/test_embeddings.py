"""common/embeddings.py + common/bert.py: our plain-torch all-MiniLM-L6-v2 against an independent reference.

Reference (slow: imports transformers) = Hugging Face transformers' BertModel loaded from the same folder
+ its own tokenizer, followed by sentence-transformers' recipe (mean pooling over the attention mask,
L2 normalisation). Finding/fetching the model files is tested in tests/test_model_files.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.embeddings import MAX_SEQ_LEN, LocalEmbedder, find_model_dir, load_local_embedder
from common.errors import UserError

SENTENCES = [
    "How many vacation days do I get?",
    "Employees receive 22 days of paid annual leave per year.",
    "The robot's battery lasts about ten hours.",
    "我们公司每年有二十二天带薪年假。",  # Chinese: the tokenizer splits CJK characters one by one
    "Short.",
    # long: well over 256 word pieces, so truncation must match too
    " ".join(f"Sentence number {i} talks about warehouses, robots, batteries and leave policies." for i in range(60)),
]


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return load_local_embedder(device="cpu")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    d = str(find_model_dir(download=False))
    model = transformers.AutoModel.from_pretrained(d).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    pooled = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.slow
def test_matches_transformers_reference(embedder, reference):
    ours = embedder.embed(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() < 1e-4


def test_long_input_is_truncated_like_sentence_transformers(embedder):
    ids = embedder.tokenize([SENTENCES[-1]])[0]
    assert len(ids) == MAX_SEQ_LEN  # really truncated (the text is longer than 256 word pieces)


def test_unit_norm_and_batch_independence(embedder):
    short = SENTENCES[:-1]  # the 256-token one costs seconds on one thread; the reference test covers it
    a = embedder.embed(short, batch_size=32)
    b = embedder.embed(short, batch_size=2)  # different padding per batch must not change anything
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.abs(a - b).max() < 1e-5
    assert embedder.embed([]).shape == (0, 384)


def test_paraphrase_closer_than_unrelated(embedder):
    v = embedder.embed([
        "How many days of holiday do employees get per year?",
        "Staff are entitled to 22 days of paid annual leave.",
        "The robot lifts up to 300 kilograms.",
    ])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_bad_model_dir_env_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_EMBED_MODEL_DIR", str(tmp_path))
    with pytest.raises(UserError):
        find_model_dir(download=False)
