# The two commands a new user needs:
#   make demo   sets everything up, then backs up and restores generated disk images
#   make test   sets everything up, then runs the whole test suite (what CI runs)
# The interpreter the virtualenv is made from: the distribution's CPython when it is 3.11 or
# newer (Debian builds it with profile-guided and link-time optimization; a CPython built from
# source without them, as pyenv does by default, ran blockferry's incremental 8 % slower here),
# else the first python3 on PATH. `make PYTHON=...` picks another.
PYTHON ?= $(firstword $(foreach p,/usr/bin/python3 python3,$(shell $(p) -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && command -v $(p))))
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/system-packages
	scripts/system-packages
	@test -n "$(PYTHON)" || { echo "blockferry needs Python 3.11 or newer (make PYTHON=...)" >&2; exit 1; }
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
