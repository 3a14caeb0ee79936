# sglang-fairkv: `make serve` and `make test` are all a new machine needs.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.fairkv-installed
MODEL   := models/SmolLM2-135M-Instruct/fairkv_model.json
HOST    ?= 127.0.0.1
PORT    ?= 30000
ARGS    ?=
PYTEST_ARGS ?=
# two xdist workers on the 2-core machine, each pinned to its own core (test/conftest.py): a server's
# start-up is mostly single-threaded imports; tests sharing a module-scoped server carry an xdist_group
JOBS    ?= 2
XDIST   := $(if $(filter 0 1,$(JOBS)),,-n $(JOBS) --dist loadgroup)

.PHONY: install model serve serve-stock serve-router test test-fast bench device-check device-check-dry clean

install: $(STAMP) $(MODEL)

$(STAMP): scripts/install.sh requirements/cpu.txt requirements/cuda.txt python/pyproject.toml \
          kernels/pyproject.toml patches/pyproject.toml
	VENV=$(VENV) scripts/install.sh
	@touch $@

$(MODEL): $(STAMP)
	$(PY) -m sglang_fairkv.embedded_model

model: $(MODEL)

# `make serve` shows the product: per-head KV compression (AdaKV at the default ratio, prefix cache on)
# unless ARGS chooses (--kv-compress METHOD, or --fairkv-plan); `make serve-stock`: SGLang's own path.
SERVE_DEFAULT ?= --kv-compress adakv
serve: install
	@echo "Serving on http://$(HOST):$(PORT) once 'The server is fired up' appears. Try:"
	@echo "  curl -s http://$(HOST):$(PORT)/generate -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"text\": \"The capital of France is\", \"sampling_params\": {\"max_new_tokens\": 16, \"temperature\": 0}}'"
	@echo "  curl -s http://$(HOST):$(PORT)/server_info | python3 -m json.tool | grep -A12 '\"fairkv\"'"
	$(PY) -m sglang_fairkv.launch_server --host $(HOST) --port $(PORT) \
	    $(if $(findstring --kv-compress,$(ARGS))$(findstring --fairkv-plan,$(ARGS)),,$(SERVE_DEFAULT)) $(ARGS)

serve-stock: install
	$(PY) -m sglang_fairkv.launch_server --host $(HOST) --port $(PORT) $(ARGS)

# N compressed servers behind sglang-router (cache-aware: each keeps a prefix cache, the dense prefix tier).
REPLICAS ?= 2
POLICY  ?= cache_aware
ROUTER_ARGS ?= --kv-compress adakv
serve-router: install
	$(PY) -m sglang_fairkv.serve_router --replicas $(REPLICAS) --host $(HOST) --port $(PORT) --policy $(POLICY) -- $(ROUTER_ARGS)

test: install
	$(PY) -m pytest test $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest test -m "not server" $(XDIST) $(PYTEST_ARGS)

# The one-call GPU check (the lent H100 / H200 through the device tool, carry [".device"]; prepare
# .device/flashinfer first with ../shared/tools/flashinfer-for-device.sh, .device/sglang with
# ../shared/tools/sglang-for-device/build.sh): phases with deadlines (benchmark/device/run.py): pool +
# page-table kernel against the torch path, kernel vs FlashInfer, fairkv vs stock servers; $OUT gets
# summary.md, results.json and logs.tar.gz, rewritten after every phase.
device-check:
	bash benchmark/device/run.sh

# The same phases and server configurations on the CPU (tiny sizes, Triton interpreted).
device-check-dry: install
	OUT=$${OUT:-out} $(PY) benchmark/device/run.py --dry-run

clean:
	rm -rf $(VENV) models
