# Pea — the commands of the README. Everything here works on a fresh machine with the Swift toolchain;
# the targets install what else they need (Python packages into a private venv).

SWIFT        ?= swift
PYTHON       ?= python3
RELEASE_BIN  := .build/release/pea
REF_VENV     := tools/reference/.venv
NVCC         ?= $(shell command -v nvcc 2>/dev/null)
CUDA_SOURCES := $(wildcard CKernels/cuda/*.cu)

.PHONY: all build test bench fidelity fuzz cuda fixtures clean system-deps mpi

all: build

## make — the release build of the library and the `pea` tool (.build/release/pea)
build: system-deps
	$(SWIFT) build -c release --product pea

## system-deps — zlib's headers (PNG) and libjpeg's (JPEG training images); installed with apt when missing and we are root (CI), else explained
system-deps:
	@if [ ! -f /usr/include/zlib.h ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing zlib1g-dev (zlib headers for PNG output)"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q zlib1g-dev >/dev/null || \
			{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q zlib1g-dev >/dev/null; }; \
		else \
			echo "zlib headers are missing: install zlib1g-dev (Debian/Ubuntu) or zlib-devel"; exit 1; \
		fi; \
	fi
	@if [ ! -f /usr/include/jpeglib.h ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing libjpeg-dev (libjpeg-turbo headers for reading JPEG training images)"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjpeg-dev >/dev/null || \
			{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjpeg-dev >/dev/null; }; \
		else \
			echo "libjpeg headers are missing: install libjpeg-dev (Debian/Ubuntu: libjpeg62-turbo-dev) or libjpeg-turbo-devel"; exit 1; \
		fi; \
	fi

## make test — every unit and parity test (debug Swift; the C kernels are always -O3), the 2-rank training tests
## under mpirun included (make mpi first)
test: system-deps emu-test cuda-emu cuda-test cuda-compile-check mpi
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

## make mpi — .build-mpi/libpea_mpi.so, the MPI shim pea loads under mpirun/srun (CKernels/mpi/pea_mpi.c), built
## with the system MPI's mpicc; installs Debian's Open MPI (libopenmpi-dev, openmpi-bin) when mpicc or mpirun is
## missing and we are root (CI), else explains. Build it against the MPI whose launcher starts pea.
MPI_OUT := .build-mpi
MPICC   ?= mpicc
mpi: $(MPI_OUT)/libpea_mpi.so

$(MPI_OUT)/libpea_mpi.so: CKernels/mpi/pea_mpi.c
	@if ! command -v $(MPICC) >/dev/null || ! command -v mpirun >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing libopenmpi-dev and openmpi-bin (MPI for the multi-process training tests)"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libopenmpi-dev openmpi-bin >/dev/null || \
			{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libopenmpi-dev openmpi-bin >/dev/null; }; \
		else \
			echo "make mpi: $(MPICC) or mpirun was not found: install an MPI (Debian/Ubuntu: libopenmpi-dev openmpi-bin; or MPICH), or set MPICC="; exit 1; \
		fi; \
	fi
	@mkdir -p $(@D)
	$(MPICC) -O2 -Wall -Wextra -fPIC -shared -o $@ $<

## make bench — every side-by-side benchmark, ours beside the reference with the ratio printed (recorded runs:
## benchmarks/RESULTS.md): GEMM against numpy; the SD1.5 UNet forward and the PEA training step against
## torch/diffusers on the CPU (the reference libraries from `make fixtures`' venv); with a GPU (nvidia-smi finds
## one) also the CUDA kernels against torch, the UNet on cuda and the SDXL training step at 1024², fp16, batch 4 with
## and without gradient checkpointing (needs `make cuda`). Takes a while on 2 cores.
bench: build $(REF_VENV)/.installed
	$(PYTHON) benchmarks/gemm_vs_numpy.py --pea $(RELEASE_BIN)
	$(PYTHON) benchmarks/unet_vs_torch.py --pea $(RELEASE_BIN)
	$(PYTHON) benchmarks/train_step_vs_torch.py --pea $(RELEASE_BIN)
	@if nvidia-smi -L >/dev/null 2>&1; then \
		$(MAKE) cuda && \
		$(REF_VENV)/bin/python benchmarks/kernels_vs_torch.py --pea $(RELEASE_BIN) && \
		$(PYTHON) benchmarks/unet_vs_torch.py --pea $(RELEASE_BIN) --device cuda --precision fp16 --lib $(CUDA_OUT)/libpea_cuda.so && \
		for checkpointing in none both; do \
			$(PYTHON) benchmarks/train_step_vs_torch.py --pea $(RELEASE_BIN) --config benchmarks/configs/sdxl_unet.json \
				--latent 128x128 --batch 4 --device cuda --precision fp16 --gradient-checkpointing $$checkpointing \
				--lib $(CUDA_OUT)/libpea_cuda.so || exit 1; \
		done; \
	else echo "bench: no GPU here (nvidia-smi finds none): the CUDA benchmarks did not run"; fi

## make fuzz — the fuzz suite (Tests/PEADiffusionTests/FuzzTests.swift) at PEA_FUZZ_CASES cases per format (default
## here 3000; make test runs 120) from PEA_FUZZ_SEED: every case must end in a result or a clear PEAError
PEA_FUZZ_CASES ?= 3000
fuzz: system-deps
	$(SWIFT) build --build-tests
	PEA_FUZZ_CASES=$(PEA_FUZZ_CASES) $(SWIFT) test --skip-build --filter FuzzTests

## make fidelity — the PEA method measured on the bundled toy world (English teacher, Chinese + trained adapter,
## Chinese + random adapter, held-out combinations), judged by the world's classifier; prints the table
fidelity: build
	$(PYTHON) benchmarks/method_fidelity.py --pea $(RELEASE_BIN)

## make cuda — build .build-cuda/libpea_cuda.so with nvcc from CKernels/cuda/*.cu (sm_80, sm_86, sm_89, sm_90 + PTX)
cuda:
	@if [ -z "$(CUDA_NVCC)" ]; then \
		echo "make cuda: nvcc was not found; the CUDA library is not built (install the CUDA toolkit, or set NVCC=)."; \
	else \
		$(MAKE) --no-print-directory $(CUDA_LIB) && echo "make cuda: built $(CUDA_LIB)"; \
	fi

## make fixtures — regenerate Tests/Fixtures with torch/diffusers/transformers from PyPI (not part of `make test`)
fixtures: $(REF_VENV)/.installed
	$(REF_VENV)/bin/python tools/reference/make_op_fixtures.py --out Tests/Fixtures/ops
	$(REF_VENV)/bin/python tools/reference/make_model_fixtures.py --out Tests/Fixtures/models
	$(REF_VENV)/bin/python tools/reference/make_random_fixtures.py --out Tests/Fixtures/random
	$(REF_VENV)/bin/python tools/reference/make_png_fixtures.py --out Tests/Fixtures/png
	$(REF_VENV)/bin/python tools/reference/make_image_resampling_fixtures.py --out Tests/Fixtures/image_resampling
	$(REF_VENV)/bin/python tools/reference/make_image_fixtures.py --out Tests/Fixtures/images
	$(REF_VENV)/bin/python tools/reference/make_scheduler_fixtures.py --out Tests/Fixtures/schedulers
	$(REF_VENV)/bin/python tools/reference/make_tokenizer_fixtures.py --out Tests/Fixtures/tokenizers
	$(REF_VENV)/bin/python tools/reference/make_multilingual_tokenizer_fixtures.py --out Tests/Fixtures/tokenizers
	$(REF_VENV)/bin/python tools/reference/make_multilingual_fixtures.py --out Tests/Fixtures/multilingual
	$(REF_VENV)/bin/python tools/reference/make_text_encoder_fixtures.py --out Tests/Fixtures/models
	$(REF_VENV)/bin/python tools/reference/make_pipeline_fixtures.py --out Tests/Fixtures/pipelines
	$(REF_VENV)/bin/python tools/reference/make_batched_pipeline_fixtures.py --out Tests/Fixtures/pipelines/batched
	$(REF_VENV)/bin/python tools/reference/make_half_weight_fixtures.py --out Tests/Fixtures/half_weights
	$(REF_VENV)/bin/python tools/reference/make_vae_tiling_fixtures.py --out Tests/Fixtures/vae_tiling/cases.safetensors
	$(REF_VENV)/bin/python tools/reference/make_pea_pipeline_fixtures.py --out Tests/Fixtures/pea
	$(REF_VENV)/bin/python tools/reference/make_img2img_fixtures.py --out Tests/Fixtures/img2img
	$(REF_VENV)/bin/python tools/reference/make_inpaint_fixtures.py --out Tests/Fixtures/inpaint
	$(REF_VENV)/bin/python tools/reference/make_image_prep_fixtures.py --out Tests/Fixtures/image_prep
	$(REF_VENV)/bin/python tools/reference/make_single_file_fixtures.py --out Tests/Fixtures/single_file
	$(REF_VENV)/bin/python tools/reference/make_lora_fixtures.py --out Tests/Fixtures/lora
	$(REF_VENV)/bin/python tools/reference/make_kd_fixtures.py --out Tests/Fixtures/kd
	$(REF_VENV)/bin/python tools/toyworld/make_world_fixtures.py --out Tests/Fixtures/toyworld
	$(REF_VENV)/bin/python tools/reference/make_toyworld_fixtures.py --out Tests/Fixtures/toyworld

$(REF_VENV)/.installed: tools/reference/requirements.txt
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install --upgrade pip
	$(REF_VENV)/bin/pip install -r tools/reference/requirements.txt
	touch $@

## make clean — removes every build folder and library the targets here create (not tools/reference/.venv,
## the reference libraries `make fixtures` installs)
clean:
	rm -rf .build $(MPI_OUT) $(EMU_OUT) libpea_cuda_emu.so libpea_nccl_emu.so $(CUDA_OUT) libpea_cuda.so $(BUNDLE_OUT) $(STATIC_SCRATCH) $(NVCC13_VENV)

# ---------------------------------------------------------------------------------------------------------
# The CUDA sources without a GPU (CKernels/emu/README.md). The same .cu files build with nvcc (make cuda) and
# with the host C++ compiler against the SIMT emulator in CKernels/emu (make cuda-emu, make emu-test).

.PHONY: emu-test cuda-emu cuda-compile-check cuda13-compile-check clean-emu

EMU_CXX        ?= g++
EMU_OUT        := .build-emu
EMU_CXXFLAGS   ?= -std=c++17 -O2 -g -Wall -Wextra -Wno-unknown-pragmas -fPIC -pthread
EMU_INCLUDES   := -ICKernels/emu/include -ICKernels/include
EMU_CU         := -x c++ -include cuda_runtime.h
EMU_RT_OBJ     := $(patsubst CKernels/emu/src/%.cpp,$(EMU_OUT)/rt/%.o,$(wildcard CKernels/emu/src/*.cpp))
EMU_SAMPLE_OBJ := $(patsubst CKernels/cuda/samples/%.cu,$(EMU_OUT)/samples/%.o,$(wildcard CKernels/cuda/samples/*.cu))
EMU_CUDA_OBJ   := $(patsubst CKernels/cuda/%.cu,$(EMU_OUT)/cuda/%.o,$(CUDA_SOURCES))
EMU_TESTS      := $(EMU_OUT)/test_simt $(EMU_OUT)/test_samples $(EMU_OUT)/test_cublas $(EMU_OUT)/test_simt_ucontext

## make emu-test — the SIMT emulator's tests: sample kernels and planted bugs run on the CPU (no GPU, no CUDA)
emu-test: $(EMU_TESTS) $(EMU_OUT)/test_dlopen libpea_cuda_emu.so
	@for t in $(EMU_TESTS); do $$t || exit 1; done
	@$(EMU_OUT)/test_dlopen ./libpea_cuda_emu.so

## make cuda-emu — libpea_cuda_emu.so: CKernels/cuda/*.cu built for the CPU against the emulator (dlopen it like
## libpea_cuda.so), and libpea_nccl_emu.so, its NCCL stand-in (PEA_NCCL_LIB; all-reduces through the MPI shim)
cuda-emu: libpea_cuda_emu.so libpea_nccl_emu.so

libpea_cuda_emu.so: $(EMU_CUDA_OBJ) $(EMU_RT_OBJ)
	$(EMU_CXX) -shared -pthread -Wl,-Bsymbolic -Wl,-z,nodelete -o $@ $^ -ldl

libpea_nccl_emu.so: CKernels/emu/nccl_standin.c
	$(CC) -O2 -Wall -Wextra -fPIC -shared -o $@ $< -ldl

## make cuda-compile-check — every .cu under CKernels/cuda through the real nvcc (sm_80, sm_90); installs Debian's toolkit as root
cuda-compile-check:
	@tools/emu/cuda-compile-check.sh

## make cuda13-compile-check — the same check with nvcc 13.x, NVIDIA's PyPI wheels (nvidia-cuda-nvcc and the
## runtime/cuBLAS headers, ~1 GB in .build-nvcc13/; not part of make test): what lent GPU machines run
NVCC13_VENV := .build-nvcc13
cuda13-compile-check:
	@test -x $(NVCC13_VENV)/bin/pip || $(PYTHON) -m venv $(NVCC13_VENV)
	@$(NVCC13_VENV)/bin/pip install -q nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cublas nvidia-cuda-cccl
	@nvcc=$$(find -L $(NVCC13_VENV) -path '*/cu13/bin/nvcc' | head -1); \
		if [ -z "$$nvcc" ]; then echo "cuda13-compile-check: no nvcc 13 in $(NVCC13_VENV)" >&2; exit 1; fi; \
		cu=$$(dirname $$(dirname $$nvcc)); \
		NVCC=$$nvcc NVCC_FLAGS="-I$$cu/include -I$$cu/cccl" tools/emu/cuda-compile-check.sh

clean-emu:
	rm -rf $(EMU_OUT) libpea_cuda_emu.so libpea_nccl_emu.so

$(EMU_OUT)/rt/%.o: CKernels/emu/src/%.cpp
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_CXXFLAGS) $(EMU_INCLUDES) -MMD -MP -c $< -o $@

$(EMU_OUT)/rt-ucontext/simt.o: CKernels/emu/src/simt.cpp
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_CXXFLAGS) $(EMU_INCLUDES) -DPEA_EMU_UCONTEXT=1 -MMD -MP -c $< -o $@

$(EMU_OUT)/cuda/%.o: CKernels/cuda/%.cu
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_CXXFLAGS) $(EMU_INCLUDES) -MMD -MP $(EMU_CU) -c $< -o $@

$(EMU_OUT)/samples/%.o: CKernels/cuda/samples/%.cu
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_CXXFLAGS) $(EMU_INCLUDES) -MMD -MP $(EMU_CU) -c $< -o $@

$(EMU_OUT)/tests/%.o: CKernels/emu/tests/%.cpp
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_CXXFLAGS) $(EMU_INCLUDES) -MMD -MP -c $< -o $@

$(EMU_OUT)/test_simt: $(EMU_OUT)/tests/test_simt.o $(EMU_RT_OBJ)
	$(EMU_CXX) -pthread -o $@ $^

$(EMU_OUT)/test_simt_ucontext: $(EMU_OUT)/tests/test_simt.o $(EMU_OUT)/rt-ucontext/simt.o $(filter-out %/simt.o,$(EMU_RT_OBJ))
	$(EMU_CXX) -pthread -o $@ $^

$(EMU_OUT)/test_samples: $(EMU_OUT)/tests/test_samples.o $(EMU_SAMPLE_OBJ) $(EMU_RT_OBJ)
	$(EMU_CXX) -pthread -o $@ $^

$(EMU_OUT)/test_cublas: $(EMU_OUT)/tests/test_cublas.o $(EMU_RT_OBJ)
	$(EMU_CXX) -pthread -o $@ $^

$(EMU_OUT)/test_dlopen: CKernels/emu/tests/test_dlopen.c
	@mkdir -p $(@D)
	$(CC) -O1 -Wall -Wextra -o $@ $< -ldl

-include $(wildcard $(EMU_OUT)/*/*.d)

# ---------------------------------------------------------------------------------------------------------
# The CUDA backend library and its op tests. `make cuda` builds .build-cuda/libpea_cuda.so with nvcc (one object
# per .cu, so `make -j` compiles them in parallel). CKernels/cuda/tests/test_ops.cpp loads a build of the library
# with dlopen, as the Swift backend does, and checks every op against the CPU reference kernels (CKernels/cpu):
# `make cuda-test` runs it on the emulated build (libpea_cuda_emu.so), `make gpu-check` on the nvcc build.

.PHONY: cuda-test gpu-check gpu-bundle clean-cuda

CUDA_NVCC   := $(firstword $(NVCC) $(wildcard /usr/local/cuda/bin/nvcc /usr/lib/nvidia-cuda-toolkit/bin/nvcc))
CUDA_OUT    := .build-cuda
CUDA_LIB    := $(CUDA_OUT)/libpea_cuda.so
CUDA_OBJ    := $(patsubst CKernels/cuda/%.cu,$(CUDA_OUT)/obj/%.o,$(CUDA_SOURCES))
CUDA_ARCH   := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
               -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90,code=sm_90 \
               -gencode arch=compute_90,code=compute_90
NVCC_FLAGS  ?=
CPU_REF_OBJ := $(patsubst CKernels/cpu/%.c,$(EMU_OUT)/cpu/%.o,$(wildcard CKernels/cpu/*.c))
TEST_OPS    := $(EMU_OUT)/test_ops

## make cuda-test — every pea_cuda_* op of the emulated CUDA library against the CPU kernels (part of make test)
cuda-test: $(TEST_OPS) libpea_cuda_emu.so libpea_nccl_emu.so
	PEA_NCCL_LIB=./libpea_nccl_emu.so $(TEST_OPS) ./libpea_cuda_emu.so

## make gpu-check — on a machine with a GPU (nvcc + cuBLAS, no Swift): build libpea_cuda.so, run the op tests on the
## GPU (their NCCL all-reduce over one rank too, when libnccl.so.2 loads or PEA_NCCL_LIB names NCCL), then `./pea selftest --backend cuda`, the SD1.5 UNet and training step's per-op GPU profiles (`pea bench …
## --profile`) and the SDXL training step's device memory at 1024², batch 4, with and without gradient
## checkpointing (all written to benchmarks/PROFILES.md) and benchmarks/kernels_vs_torch.py (when torch imports)
## when a static `pea` was carried into the repository root (make gpu-bundle prepares such a folder)
gpu-check: $(TEST_OPS)
	@if [ -z "$(CUDA_NVCC)" ]; then echo "gpu-check: nvcc was not found (install the CUDA toolkit, or set NVCC=)" >&2; exit 1; fi
	$(MAKE) --no-print-directory $(CUDA_LIB)
	$(TEST_OPS) $(CUDA_LIB)
	@if [ -x ./pea ]; then \
		echo "PEA_CUDA_LIB=$(CURDIR)/$(CUDA_LIB) ./pea selftest --backend cuda"; \
		LD_LIBRARY_PATH=$(CURDIR)/lib:$$LD_LIBRARY_PATH PEA_CUDA_LIB=$(CURDIR)/$(CUDA_LIB) ./pea selftest --backend cuda || exit 1; \
		{ echo "# Per-op GPU profiles"; echo; \
		  echo "Written by make gpu-check on $$(date -u +%F), $$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)."; \
		  echo "Each table: one more evaluation or training step with every op call bracketed by CUDA events (pea bench --profile)."; \
		} > benchmarks/PROFILES.md; \
		for bench in "unet --batch 2" "train-step --batch 4"; do \
			command="./pea bench $$bench --config benchmarks/configs/sd15_unet.json --backend cuda --precision fp16 --profile"; \
			echo "$$command"; \
			printf '\n## `%s`\n\n```\n' "$$command" >> benchmarks/PROFILES.md; \
			table=$$(LD_LIBRARY_PATH=$(CURDIR)/lib:$$LD_LIBRARY_PATH PEA_CUDA_LIB=$(CURDIR)/$(CUDA_LIB) $$command) || exit 1; \
			printf '%s\n' "$$table"; printf '%s\n```\n' "$$table" >> benchmarks/PROFILES.md; \
		done; \
		printf '\n## SDXL training step at 1024² (latent 128×128), fp16, batch 4: does it fit a 24 GB GPU? (peak_device_mb)\n\n```\n' >> benchmarks/PROFILES.md; \
		for flag in "" "--gradient-checkpointing"; do \
			command="./pea bench train-step --config benchmarks/configs/sdxl_unet.json --latent 128x128 --batch 4 --backend cuda --precision fp16 --repeats 2 --json $$flag"; \
			echo "$$command"; \
			line=$$(LD_LIBRARY_PATH=$(CURDIR)/lib:$$LD_LIBRARY_PATH PEA_CUDA_LIB=$(CURDIR)/$(CUDA_LIB) $$command) || exit 1; \
			printf '%s\n' "$$line"; printf '%s\n%s\n' "$$command" "$$line" >> benchmarks/PROFILES.md; \
		done; \
		printf '```\n' >> benchmarks/PROFILES.md; \
	else \
		echo "gpu-check: no ./pea here, so no selftest (build one elsewhere: swift build -c release --static-swift-stdlib)"; \
	fi
	@if [ -x ./pea ] && $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "$(PYTHON) benchmarks/kernels_vs_torch.py --pea ./pea --lib $(CUDA_LIB) --write benchmarks/RESULTS.md"; \
		LD_LIBRARY_PATH=$(CURDIR)/lib:$$LD_LIBRARY_PATH $(PYTHON) benchmarks/kernels_vs_torch.py --pea ./pea --lib $(CUDA_LIB) --write benchmarks/RESULTS.md; \
	else \
		echo "gpu-check: no kernel benchmarks (they need ./pea and a $(PYTHON) that imports torch)"; \
	fi

clean-cuda:
	rm -rf $(CUDA_OUT)

## make gpu-bundle — .build-gpu-bundle/: a static, stripped `pea` plus what `make cuda`, `make cuda-test` and
## `make gpu-check` need (CKernels/{include,cuda,cpu,emu}, the Makefile, benchmarks/), to carry to a GPU machine
## that has nvcc and Python+torch but no Swift; there: `make gpu-check`
BUNDLE_OUT    := .build-gpu-bundle
STATIC_SCRATCH := .build-static
gpu-bundle: system-deps
	$(SWIFT) build -c release --product pea --static-swift-stdlib --scratch-path $(STATIC_SCRATCH)
	rm -rf $(BUNDLE_OUT)
	mkdir -p $(BUNDLE_OUT)/CKernels $(BUNDLE_OUT)/benchmarks $(BUNDLE_OUT)/tools
	cp $(STATIC_SCRATCH)/release/pea $(BUNDLE_OUT)/pea
	strip $(BUNDLE_OUT)/pea
	# libjpeg is the one shared library pea needs that a bare GPU image may lack; it travels in lib/ (gpu-check
	# puts that folder on LD_LIBRARY_PATH).
	mkdir -p $(BUNDLE_OUT)/lib
	cp -L $$(ldd $(BUNDLE_OUT)/pea | awk '/libjpeg/ { print $$3 }') $(BUNDLE_OUT)/lib/
	cp -R CKernels/include CKernels/cuda CKernels/cpu CKernels/emu $(BUNDLE_OUT)/CKernels/
	cp Makefile $(BUNDLE_OUT)/
	cp benchmarks/*.py $(BUNDLE_OUT)/benchmarks/
	cp -R benchmarks/configs $(BUNDLE_OUT)/benchmarks/
	if [ -f benchmarks/RESULTS.md ]; then cp benchmarks/RESULTS.md $(BUNDLE_OUT)/benchmarks/; fi
	if [ -d tools/emu ]; then cp -R tools/emu $(BUNDLE_OUT)/tools/; fi
	printf '%s\n' \
		'Pea GPU bundle (made by `make gpu-bundle`): a static pea, the CUDA/CPU kernel sources, the Makefile, benchmarks.' \
		'On a machine with nvcc, cuBLAS, a GPU and python3 with torch (no Swift needed), in this folder run:' \
		'    make gpu-check    # builds .build-cuda/libpea_cuda.so, op tests, pea selftest --backend cuda, per-op profiles, kernels_vs_torch.py' \
		'Results land in benchmarks/RESULTS.md (section "CUDA kernels vs PyTorch") and benchmarks/PROFILES.md; copy them back.' > $(BUNDLE_OUT)/README.txt
	@echo "make gpu-bundle: $(BUNDLE_OUT) ready ($$(du -sh $(BUNDLE_OUT) | cut -f1); pea $$(du -h $(BUNDLE_OUT)/pea | cut -f1)); carry it and run 'make gpu-check' there"

$(CUDA_OUT)/obj/%.o: CKernels/cuda/%.cu
	@mkdir -p $(@D)
	$(CUDA_NVCC) -std=c++17 -O3 $(CUDA_ARCH) -Xcompiler -fPIC -ICKernels/include $(NVCC_FLAGS) -MMD -MP -c $< -o $@

$(CUDA_LIB): $(CUDA_OBJ)
	$(CUDA_NVCC) -shared $(CUDA_ARCH) -Xcompiler -fPIC $(NVCC_FLAGS) $^ -lcublasLt -lcublas -ldl -o $@

$(EMU_OUT)/cpu/%.o: CKernels/cpu/%.c
	@mkdir -p $(@D)
	$(CC) -O3 -fno-math-errno -Wall -Wno-unused-function -fPIC -pthread -ICKernels/include -MMD -MP -c $< -o $@

$(EMU_OUT)/cuda-tests/%.o: CKernels/cuda/tests/%.cpp
	@mkdir -p $(@D)
	$(EMU_CXX) -std=c++17 -O2 -g -Wall -Wextra -ICKernels/include -MMD -MP -c $< -o $@

$(TEST_OPS): $(EMU_OUT)/cuda-tests/test_ops.o $(CPU_REF_OBJ)
	$(EMU_CXX) -pthread -o $@ $^ -ldl -lm

-include $(wildcard $(CUDA_OUT)/obj/*.d)
