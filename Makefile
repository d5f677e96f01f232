# tilecl: `make demo` and `make test` install what they need into .venv (torch 2.13.0 CPU wheel,
# pinned triton) and run. Nothing here needs a GPU.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.tilecl-installed
SOURCES := setup.py pyproject.toml CMakeLists.txt .ci/requirements.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: install demo test lint bench-cpu clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r .ci/requirements.txt
	$(PIP) install -q --no-deps open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
	TILECL_REQUIRE_NATIVE=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) bench/demo.py

test: install
	$(PY) -m ruff check python tests bench tritonops examples
	$(PY) -m pytest -q tests  # tests/test_triton_backend.py sets TRITON_INTERPRET=1 itself
	@if [ -f .ci/triton_compile_report.py ]; then $(PY) .ci/triton_compile_report.py; fi
	@if [ -f .ci/triton_compat.sh ]; then PY=$(PY) bash .ci/triton_compat.sh; fi
	@if [ -f .ci/compile_cuda.sh ]; then bash .ci/compile_cuda.sh; fi

bench-cpu: install
	$(PY) -m bench --device cpu

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info
