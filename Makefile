# The two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test soak lint bench clean lock browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/streamfleet demo

test: $(STAMP)
	$(BIN)/python -m pytest

# A real browser for tests/test_browser.py (skipped without one; CI requires it): Debian's Chromium.
browser:
	command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

soak: $(STAMP)
	STREAMFLEET_SOAK_JOBS=$${STREAMFLEET_SOAK_JOBS:-300} $(BIN)/python -m pytest -m soak -s -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The image installs from requirements.lock: every runtime dependency, exact. Refresh it after
# changing the dependencies in pyproject.toml (tests/test_deploy.py checks the two agree).
lock:
	rm -rf /tmp/streamfleet-lock && $(PYTHON) -m venv /tmp/streamfleet-lock
	/tmp/streamfleet-lock/bin/python -m pip install --quiet --disable-pip-version-check .
	{ echo "# Runtime dependencies of the image, exact (make lock). Python 3.11, Linux x86_64."; \
	  /tmp/streamfleet-lock/bin/python -m pip freeze --disable-pip-version-check | grep -v '^streamfleet' ; } > requirements.lock
	rm -rf /tmp/streamfleet-lock
