# Two commands on a fresh machine: `make demo` (train + evaluate on the built-in data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast docs wheel-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,train,plot,docs]'
# clip-retrieval's ClipClient and web front end, for tests/serve/test_knn_service.py: without its dependencies
# (torchvision, faiss, flask, ...), which the client (it needs only requests) and the page do not use
	$(PY) -m pip install -q --no-deps clip-retrieval==2.45.0
# autofaiss, for tests/search/test_embed.py: its numpy<2 pin would downgrade numpy under onnx; it runs on numpy 2
	$(PY) -m pip install -q --no-deps autofaiss 'fire<0.7' termcolor six
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipforge demo --output demo_output

# Everything, including the examples in README.md and docs/ (tests/docs); what CI's .ci/run calls.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# The inner loop: the tests not marked slow (2 to 2.5 minutes on 2 cores).
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# The documentation site; --strict turns a broken link or a page missing from the navigation into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# Build the wheel and sdist, install the wheel into a clean virtualenv and smoke-test the installed CLI.
wheel-check: $(STAMP)
	bash .ci/wheel_check.sh

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) demo_output site dist
