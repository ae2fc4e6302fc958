# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test lint bench

setup: $(STAMP) browser

# tests/test_dashboard.py drives Debian's chromium + chromedriver; install them when missing and we
# can (root with apt). Never fails setup: without them that test fails, saying how to install them.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium chromium-driver) \
	    || echo "warning: could not install chromium chromium-driver; the dashboard test will fail without them"; \
	  else \
	    echo "note: chromium/chromedriver missing; install with: sudo apt-get install chromium chromium-driver"; \
	  fi; \
	fi

# setuptools notes every editable install of a flat layout ("Editable installation ... be careful with
# folders"); it says nothing about this project, so it is filtered to keep the install quiet.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/linewatch --config demo/linewatch.yaml run --replay --exit-when-done

test: setup
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/engine.py
	$(PY) bench/pipeline.py
