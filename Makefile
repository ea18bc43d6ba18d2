# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv if missing, make the demo assets, train the demo SALM on 2 Ray workers
#   make test   - create .venv if missing, run the whole test suite (unit + integration)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-duplex test test-fast lint format bench clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU build that pip finds locally; a looser pin may pull CUDA wheels.
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

NEW_VOICE_WAV := data/demo/asr/new_voice_wav/asr-new-voice-000000.wav

demo: $(STAMP)
	$(PY) -m orchestrator data demo --out data/demo
	$(PY) -m orchestrator train configs/demo/salm.yaml
	# The best checkpoint on sentences it never heard: the test split, and test sentences in voices no split has.
	$(PY) -m orchestrator eval experiments/demo_salm --data data/demo/asr/test data/demo/asr/test_new_voice
	@echo "a new sentence in a new voice, $(NEW_VOICE_WAV): \"$$(cat $(NEW_VOICE_WAV:.wav=.txt))\""
	$(PY) -m orchestrator infer experiments/demo_salm $(NEW_VOICE_WAV)
	@echo "next: source $(VENV)/bin/activate   # puts speechlm and mlflow on PATH for the commands in README.md"

# The duplex demo (README, "The demo"): 8 h of conversations, their codec codes cached once, then about 11 minutes
# of training. With the demo SALM from `make demo` present, it also scores the generated speech (ASR-BLEU).
demo-duplex: $(STAMP)
	$(PY) -m orchestrator data demo --out data/demo_duplex --hours 0.1 --s2s-hours 8
	$(PY) -m orchestrator data add-codes data/demo_duplex/s2s --codec data/demo_duplex/codec
	$(PY) -m orchestrator train configs/demo/s2s_duplex.yaml \
		$(if $(wildcard experiments/demo_salm),model.scoring_asr=experiments/demo_salm)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	for script in bench/*.py; do $(PY) $$script || exit 1; done

clean-demo:
	rm -rf data/demo data/demo_duplex experiments/demo_*
