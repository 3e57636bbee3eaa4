# Two set-up commands: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is pinned: that CPU wheel is what this project's machines carry;
# any other spec pulls a multi-gigabyte CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo bench capi clean FORCE

# Strict editable install: a tree of links under build/ that IDEs and mypy can follow
# (the default editable mode hides the `avg_edge` -> repository-root mapping in an import
# hook).  A strict install does not see new files, so it is redone whenever the set of
# package files changes (PKG_LIST is rewritten only then).
PKG_LIST := $(VENV)/.package-files
INSTALL := $(VENV)/.installed

$(INSTALL): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[export,capi,serve,dev,triton]" --config-settings editable_mode=strict
	touch $@

$(PKG_LIST): FORCE
	@mkdir -p $(VENV)
	@find . -name '*.py' -not -path './.*' -not -path './build/*' -not -path './builds/*' \
	    -not -path './tests/*' -not -path './benchmarks/*' | sort > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(VENV)/.linked: $(PKG_LIST) $(INSTALL)
	$(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=strict
	touch $@

FORCE:

# A real tritonserver (2.51, Python backend, CPU) for the Triton tests: the one bundled in
# the nvidia-pytriton wheel, unpacked, not installed (its package pins numpy<2).  When the
# wheel cannot be fetched the Triton tests skip and say so.
TRITON_WHEEL := nvidia-pytriton==0.7.0
TRITON_DIR := build/tritonserver
$(TRITON_DIR)/.unpacked: | $(INSTALL)
	@mkdir -p build/wheels
	@if $(PY) -m pip download -q --no-deps --only-binary=:all: -d build/wheels "$(TRITON_WHEEL)" >/dev/null 2>&1; then \
	    rm -rf $(TRITON_DIR) && $(PY) -m zipfile -e build/wheels/nvidia_pytriton-0.7.0-*.whl $(TRITON_DIR) && \
	    chmod +x $(TRITON_DIR)/pytriton/tritonserver/bin/tritonserver \
	        $(TRITON_DIR)/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub && touch $@; \
	else echo "could not download $(TRITON_WHEEL): the Triton tests will skip"; fi

# Tests run in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time, so
# a file's module fixtures (its builds) are made once; session fixtures are made in each
# worker that needs them.  Two workers is this project's machines' core count: the builds
# in fixtures are single-threaded Python for most of their time.  TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: $(VENV)/.linked $(TRITON_DIR)/.unpacked
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

DEMO_BUILD := builds/avg-edge-demo

# Build the bundled demo model once (fp32, ONNX Runtime), then tell its story: a coarse
# question routed to few visual tokens, a fine one routed to more, and the same fine
# question under a tight visual-token budget; -v prints the chosen granularity, visual
# tokens vs 576 and time to first token to stderr.
$(DEMO_BUILD)/manifest.json: $(VENV)/.linked $(wildcard model/demo/checkpoint/*)
	$(VENV)/bin/avg-export build --force

demo: $(DEMO_BUILD)/manifest.json
	@echo; echo '$$ avg-run examples/demo-1.png "What colour is the background?" -v'
	@$(VENV)/bin/avg-run examples/demo-1.png "What colour is the background?" -v
	@echo; echo '$$ avg-run examples/demo-2.png "What colour is the marker right of the white dot?" -v'
	@$(VENV)/bin/avg-run examples/demo-2.png "What colour is the marker right of the white dot?" -v
	@echo; echo '$$ avg-run examples/demo-2.png "What colour is the marker right of the white dot?" --max-visual-tokens 200 -v'
	@$(VENV)/bin/avg-run examples/demo-2.png "What colour is the marker right of the white dot?" --max-visual-tokens 200 -v

bench: $(VENV)/.linked $(TRITON_DIR)/.unpacked
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_runtime.py --tiny
	$(PY) benchmarks/bench_export.py
	$(PY) benchmarks/bench_kv_routes.py
	$(PY) benchmarks/bench_routing.py
	$(PY) benchmarks/bench_roofline.py
	$(PY) benchmarks/bench_slots.py
	$(PY) benchmarks/bench_triton.py
	$(PY) benchmarks/bench_server.py

capi: $(VENV)/.linked
	$(PY) -m avg_edge.runtime.capi.compile --out build/capi
	cc -Wall -I include examples/c/avg_edge_example.c -L build/capi -lavg_edge -Wl,-rpath,$(CURDIR)/build/capi -o build/avg_edge_example
	@echo "try: build/avg_edge_example builds/avg-edge-demo examples/<image>.png \"What colour is the background?\""

clean:
	rm -rf $(VENV) *.egg-info build/__editable__*
