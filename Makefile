# edgetune — every target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgetune-installed
EXTRAS ?= train,serve,client,dev,postgres

# Optional arguments, passed on only when set. ARGS="…" passes extra CLI arguments to every command target
# (train, tune, export, engine, serve, client); SET="…" is kept as an alias for ARGS on `make train`.
opt = $(if $($(1)),$(2) $($(1)))

# A command line as make shows it, with the password of any URL in it (scheme://user:PASSWORD@host, e.g.
# STORAGE=postgresql://…) replaced by ***: the targets that may take a storage URL print it with `show` and run
# the command silently, so make never echoes the password (nothing is shown under `make -s`).
url_rest = $(word 2,$(subst ://, ,$(1)))
mask_url = $(if $(and $(findstring @,$(call url_rest,$(1))),$(findstring :,$(firstword $(subst @, ,$(call url_rest,$(1)))))),$(firstword $(subst ://, ,$(1)))://$(firstword $(subst :, ,$(call url_rest,$(1)))):***@$(lastword $(subst @, ,$(call url_rest,$(1)))),$(1))
masked = $(foreach w,$(1),$(call mask_url,$(w)))
show = $(if $(findstring s,$(firstword -$(MAKEFLAGS))),,$(info $(call masked,$(1))))

.PHONY: install test test-stress test-fast lint format format-check proto proto-check train tune export engine serve client dashboard report \
        edge-node edge-node-stop bench-device bench bench-search bench-train bench-serve bench-client soak clean help \
        harvest label bench-field

help:
	@echo "make tune | make test | make test-stress | make train DATA=textures EPOCHS=2 OUT=runs/x | make export RUN=… OUT=…"
	@echo "make serve BUNDLE=… PORT=50051 | make client SOURCE=… SERVER=127.0.0.1:50051 | make dashboard | make bench"
	@echo "make soak [SOAK_DURATION=120] [SOAK_ARGS='--bundle … --bundle-b …']  (hostile-load soak of the edge server)"
	@echo "make harvest SERVER=host:port OUT=dir | make label DIR=dir [PORT=8765] | make tune DATA=… ADD=dir WARM=<study out> [INIT=warm] | make bench-field"
	@echo "make report [STUDIES=a,b] [STORAGE=…] | make lint | make format | make proto | make proto-check"

$(STAMP): pyproject.toml deploy/ray-auth.pth
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@# Ray 2.60: a head started where a token exists runs token auth, a client with RAY_AUTH_MODE unset does not;
	@# in this venv every Python (ray CLI, drivers, workers) follows the head's rule (deploy/ray-auth.pth)
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'edgetune-ray-auth.pth').write_text(pathlib.Path('deploy/ray-auth.pth').read_text())"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite beside a CPU hog that keeps every core busy (one `while True: pass` per core, at least 2; started
# here and stopped by their PIDs on exit): no test may depend on how fast the machine is today.
STRESS_HOGS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -lt 2 ] && n=2; echo $$n)
test-stress: $(STAMP)
	@hogs=""; trap 'kill $$hogs 2>/dev/null' EXIT INT TERM; \
	for _ in $$(seq 1 $(STRESS_HOGS)); do $(PY) -c "while True: pass" & hogs="$$hogs $$!"; done; \
	echo "test-stress: $(STRESS_HOGS) CPU hogs (PIDs$$hogs) beside the suite"; start=$$(date +%s); \
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	echo "test-stress: pytest exited $$rc after $$(( $$(date +%s) - start )) s (load average $$(cut -d' ' -f1-3 /proc/loadavg))"; \
	exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

LINT_PATHS := edgetune trainer tuner edge_server edge_client fieldloop testkit tests bench
lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy edgetune trainer tuner edge_server edge_client fieldloop

# ruff format over the tree (pyproject.toml [tool.ruff.format]); `make lint` fails on a file it would change, and
# pre-commit's ruff-format hook formats the files a commit touches.
format: $(STAMP)
	$(PY) -m ruff format $(LINT_PATHS)
	$(PY) -m ruff check --fix $(LINT_PATHS)

format-check: $(STAMP)
	$(PY) -m ruff format --check $(LINT_PATHS)

# Generated gRPC code: the only way edgetune/v1/*_pb2*.py are produced (a test checks they are fresh).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/edgetune/v1/*.proto

# The committed stubs equal what `make proto` would write now (generated into a temporary directory and compared).
proto-check: $(STAMP)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m grpc_tools.protoc -Iproto --python_out="$$tmp" --pyi_out="$$tmp" --grpc_python_out="$$tmp" \
	  proto/edgetune/v1/*.proto || exit 1; \
	stale=""; for f in "$$tmp"/edgetune/v1/*; do cmp -s "$$f" "edgetune/v1/$${f##*/}" || stale="$$stale $${f##*/}"; done; \
	if [ -n "$$stale" ]; then echo "proto-check: stale in edgetune/v1:$$stale (run make proto)"; exit 1; fi; \
	echo "proto-check: edgetune/v1 stubs match proto/"

train: $(STAMP)
	$(PY) -m trainer $(call opt,DATA,--data) $(call opt,CONFIG,--config) $(call opt,EPOCHS,--epochs) \
	  $(call opt,OUT,--out) $(call opt,BACKBONE,--backbone) $(call opt,WORKERS,--workers) $(call opt,IMG,--img) \
	  $(call opt,INIT,--init) $(call opt,REPEATS,--repeats) $(call opt,SEED,--seed) $(ARGS) $(SET)

# With ADD= (labelled field frames, make label) and WARM= (the previous study's OUT): a warm study (tuner/field.py)
# on the original data plus the field frames, the previous best configurations first, INIT=warm|<run> optional.
TUNE_MAIN = $(if $(or $(ADD),$(WARM)),-m tuner.field $(call opt,ADD,--add) $(call opt,WARM,--warm) $(call opt,INIT,--init),-m tuner)
TUNE_CMD = $(PY) $(TUNE_MAIN) $(call opt,DATA,--data) $(call opt,STUDY,--study) $(call opt,TRIALS,--trials) \
  $(call opt,TIME,--time-budget) $(call opt,STORAGE,--storage) $(call opt,SPACE,--space) \
  $(call opt,GPUS_PER_TRIAL,--gpus-per-trial) $(call opt,WORKERS_PER_TRIAL,--workers-per-trial) \
  $(call opt,EPOCHS,--epochs) $(call opt,OUT,--out) $(call opt,IMG,--img) $(if $(RESUME),--resume) \
  $(call opt,TARGET,--target) $(call opt,MAX_LATENCY_MS,--max-latency-ms) $(ARGS)
tune: $(STAMP)
	$(call show,$(TUNE_CMD))
	@$(TUNE_CMD)

# Device in the loop: join this machine (a Jetson, or a simulated target) to a running Ray head as the timing
# node of TARGET (resource edge_target:<TARGET>, no CPUs/GPUs offered to training); stop it with Ray's own
# shutdown of that node. On a Jetson: VENV=.venv-edge EXTRAS=serve,edge make edge-node … (no torch needed).
edge-node: $(STAMP)
	@test -n "$(HEAD)" -a -n "$(TARGET)" || { echo "usage: make edge-node HEAD=<head host>:<port> TARGET=<name>"; exit 2; }
	$(PY) -m edge_server.agent start --head $(HEAD) --target $(TARGET) $(ARGS)

edge-node-stop: $(STAMP)
	$(PY) -m edge_server.agent stop $(call opt,TARGET,--target)

export: $(STAMP)
	$(PY) -m trainer.export $(call opt,RUN,--run) $(call opt,OUT,--out) $(ARGS)

engine: $(STAMP)
	$(PY) -m edge_server.engine $(call opt,BUNDLE,--bundle) $(call opt,PRECISION,--precision) $(ARGS)

serve: $(STAMP)
	$(PY) -m edge_server $(call opt,CONFIG,--config) $(call opt,BUNDLE,--bundle) $(call opt,PORT,--port) \
	  $(call opt,HOST,--host) $(call opt,BACKEND,--backend) $(ARGS)

client: $(STAMP)
	$(PY) -m edge_client $(call opt,SOURCE,--source) $(call opt,SERVER,--server) $(call opt,LOG,--log) $(ARGS)

# Field loop: pull the capture spool of a server started with ARGS="--capture DIR" (admin token: $$EDGETUNE_ADMIN_TOKEN
# or ARGS="--admin-token-file F"); label it in the browser on 127.0.0.1.
harvest: $(STAMP)
	@test -n "$(SERVER)" -a -n "$(OUT)" || { echo "usage: make harvest SERVER=host:port OUT=dir [ARGS='--tls-ca ca.pem --admin-token-file f']"; exit 2; }
	$(PY) -m edge_client.harvest --server $(SERVER) --out $(OUT) $(ARGS)

label: $(STAMP)
	@test -n "$(DIR)" || { echo "usage: make label DIR=dir [PORT=8765]"; exit 2; }
	$(PY) -m fieldloop.label --dir $(DIR) $(call opt,PORT,--port) $(ARGS)

DASHBOARD_CMD = $(PY) -m tuner.dashboard $(call opt,STORAGE,--storage) $(call opt,PORT,--port)
dashboard: $(STAMP)
	$(call show,$(DASHBOARD_CMD))
	@$(DASHBOARD_CMD)

# With STUDIES=a,b: their side-by-side table; without: the studies of the storage (names, trials, best value).
REPORT_CMD = $(if $(STUDIES),$(PY) -m tuner.report --studies $(STUDIES) $(call opt,STORAGE,--storage) \
  $(call opt,OUT,--out),$(PY) -m tuner.studies $(call opt,STORAGE,--storage))
report: $(STAMP)
	$(call show,$(REPORT_CMD))
	@$(REPORT_CMD)

bench: bench-search bench-train bench-serve bench-client bench-device
bench-search: $(STAMP)
	$(PY) bench/bench_search.py $(if $(SEEDS),--seeds $(SEEDS)) $(BENCH_ARGS)
bench-train: $(STAMP)
	$(PY) bench/bench_train.py $(BENCH_ARGS)
bench-serve: $(STAMP)
	$(PY) bench/bench_serve.py $(BENCH_ARGS)
bench-client: $(STAMP)
	$(PY) bench/bench_client.py $(BENCH_ARGS)
bench-device: $(STAMP)
	$(PY) bench/bench_device.py $(BENCH_ARGS)
bench-field: $(STAMP)
	RAY_ADDRESS=local $(PY) bench/bench_field.py $(BENCH_ARGS)

# Soak + fuzz of the edge server under hostile load (not part of `make test`; tests/test_soak.py runs 20 s of it).
SOAK_DURATION ?= 120
soak: $(STAMP)
	$(PY) bench/soak.py --duration $(SOAK_DURATION) --json bench/results/soak.json $(SOAK_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
