# `make demo` and `make test` work from a fresh clone: they create .venv, install edgeopt
# with the extras the demo and the tests need, then run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= builder,agent,fleet,examples,test,litert,tflite-build
# A local CPU wheel of this version is on the build machines; other versions pull CUDA builds.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# mosquitto is the MQTT broker the telemetry tests start on loopback; openssl makes the
# certificates of the MQTT-over-TLS test.
system-deps:
	@missing=""; \
	{ command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "missing system packages:$$missing; run 'sudo apt-get install$$missing'"; exit 1; fi; \
	fi

# Without mosquitto (and without root to install it) the demo uses an embedded amqtt broker.
demo: setup
	@$(MAKE) --no-print-directory system-deps || echo "continuing: the demo starts an embedded amqtt broker instead"
	$(BIN)/python examples/demo.py

test: setup system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
