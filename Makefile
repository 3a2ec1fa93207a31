# Pea — the commands of the README. Everything here works on a fresh machine with the Swift toolchain;
# the targets install what else they need (Python packages into a private venv).

SWIFT        ?= swift
PYTHON       ?= python3
RELEASE_BIN  := .build/release/pea
REF_VENV     := tools/reference/.venv
NVCC         ?= $(shell command -v nvcc 2>/dev/null)
CUDA_SOURCES := $(wildcard CKernels/cuda/*.cu)

.PHONY: all build test bench cuda fixtures clean

all: build

## make — the release build of the library and the `pea` tool (.build/release/pea)
build:
	$(SWIFT) build -c release --product pea

## make test — every unit and parity test (debug Swift; the C kernels are always -O3)
test:
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

## make bench — the side-by-side benchmarks; results are printed (see benchmarks/RESULTS.md for recorded ones)
bench: build
	$(PYTHON) benchmarks/gemm_vs_numpy.py --pea $(RELEASE_BIN)

## make cuda — build libpea_cuda.so with nvcc (the CUDA backend arrives with its issue)
cuda:
ifeq ($(NVCC),)
	@echo "make cuda: nvcc was not found; the CUDA library is not built (install the CUDA toolkit, or set NVCC=)."
else ifeq ($(CUDA_SOURCES),)
	@echo "make cuda: nvcc is $(NVCC), but CKernels/cuda/ has no .cu sources yet; nothing to build."
else
	$(NVCC) -O3 -shared -Xcompiler -fPIC -ICKernels/include $(CUDA_SOURCES) -lcublas -o libpea_cuda.so
endif

## make fixtures — regenerate Tests/Fixtures with torch/diffusers/transformers from PyPI (not part of `make test`)
fixtures: $(REF_VENV)/.installed
	$(REF_VENV)/bin/python tools/reference/make_op_fixtures.py --out Tests/Fixtures/ops

$(REF_VENV)/.installed: tools/reference/requirements.txt
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install --upgrade pip
	$(REF_VENV)/bin/pip install -r tools/reference/requirements.txt
	touch $@

clean:
	rm -rf .build libpea_cuda.so
