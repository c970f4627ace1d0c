# The two commands a new user needs:
#   make demo   sets everything up, then backs up and restores generated disk images
#   make test   sets everything up, then runs the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/system-packages
	scripts/system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/blockferry demo blockferry-demo

test: setup
	$(BIN)/pytest -q

bench: setup
	scripts/system-packages bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info blockferry-demo .pytest_cache
