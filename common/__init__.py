"""Shared helpers for the lessons: the local SmolLM2 model in plain torch, its tokenizer,
sampling, one LLM client (OpenAI-compatible API or local model), and small utilities.

Modules are imported lazily by the lessons (``from common.client import LLMClient``) so that
``import common`` stays cheap and does not pull in torch.
"""
