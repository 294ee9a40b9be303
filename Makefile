# `make demo` and `make test` each set up .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the tests whose results depend on floating-point kernels (tests/numerics.py says how they compare)
NUMERICS := tests/test_models.py tests/test_speed_parity.py tests/test_loss.py tests/test_distributed.py \
            tests/test_cache.py tests/test_official.py tests/test_backbone_weights.py tests/test_segmentation.py \
            tests/test_checkpoint.py tests/test_transformers_dinov3.py tests/test_gradcache.py \
            tests/test_dynamics.py tests/test_siglip.py tests/test_unlock.py tests/test_official_options.py
# another CPU's kernels, emulated on this one: torch's own dispatch, MKL's and oneDNN's
BASELINE_KERNELS := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
AVX2_KERNELS     := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2

.PHONY: demo demo-curation test test-fast test-kernels check-install setup clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/dinotxt demo

demo-curation: $(STAMP)
	$(BIN)/dinotxt demo --curation

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the fast half, for the edit-test loop (the end-to-end runs in their own processes are marked slow)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# the numerics-sensitive tests on the baseline (SSE) kernels with 1 thread, and on AVX2 kernels
test-kernels: $(STAMP)
	env $(BASELINE_KERNELS) DINOTXT_TEST_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(NUMERICS)
	env $(AVX2_KERNELS) $(BIN)/python -m pytest -q -p no:cacheprovider $(NUMERICS)

# a fresh venv, a non-editable `pip install ".[train]"` with every dependency from the registry, and the
# CLI from another folder (about 6 GB and a few minutes)
check-install:
	rm -rf /tmp/dinotxt-check-install && $(PYTHON) -m venv /tmp/dinotxt-check-install/venv
	/tmp/dinotxt-check-install/venv/bin/python -m pip install --quiet ".[train]"
	cd /tmp/dinotxt-check-install && venv/bin/dinotxt demo --help > /dev/null && venv/bin/dinotxt models \
	  && venv/bin/dinotxt train debug optim.max_steps=2 trainer.val_every_n_steps=0 data.world.num_train=32 \
	     data.world.num_eval=0 data.world.samples_per_shard=32 data.num_workers=0 eval.zeroshot_dir=null \
	  && test -f runs/debug/checkpoint/model.safetensors && echo "check-install: OK"

clean:
	rm -rf $(VENV) runs .pytest_cache

# the GPU check (bench/gpu_check.py): the paper configuration on one CUDA device, every speed option, faiss-gpu
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py
