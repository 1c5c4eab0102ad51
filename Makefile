# icd-lite: two commands do everything.
#   make figures   run every notebook with papermill (toy preset), figures -> figures/, executed
#                  copies -> build/; DEVICE=cuda runs them on a GPU
#   make test      the test suite, then every notebook with params/ci.yaml under pytest --nbval-lax
# Both create the virtual environment .venv/ first when it is missing.

PYTHON     ?= python3
VENV       ?= .venv
# A CPU build of torch by default; on a GPU machine use e.g. TORCH_SPEC="torch" (CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Optional papermill parameters file for bigger runs: make figures PARAMS=params/full.yaml
# (checked first: a key that no notebook's parameters cell declares is refused).
PARAMS     ?=
# Where the notebooks' models run: auto (CUDA if available, else CPU), cpu, cuda, cuda:N.
# It is passed as -p device, which papermill applies after PARAMS: set the device here, not there.
DEVICE     ?= auto

PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.icd-lite-installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
export HF_HUB_OFFLINE ?= 1

.PHONY: venv figures report test gpu-check sd15-bench train train-world train-students train-ablations lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $@

# The only target that writes the committed figures/: a notebook run any other way writes to a
# scratch folder (icd_lite/figures.py).
figures: $(STAMP)
	@mkdir -p build/params figures
	$(if $(PARAMS),@$(PY) -m icd_lite.notebook_params check $(PARAMS) $(NOTEBOOKS))
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; start=$$(date +%s); name=$$(basename $$nb .ipynb); \
	  $(if $(PARAMS),$(PY) -m icd_lite.notebook_params section $(PARAMS) $$nb > build/params/$$name.yaml || exit 1;) \
	  ICD_LITE_FIGURES=$(CURDIR)/figures $(PY) -m papermill --kernel python3 --cwd notebooks \
	    --log-level WARNING $(if $(PARAMS),-f build/params/$$name.yaml) -p device $(DEVICE) \
	    $$nb build/$$name.ipynb || exit 1; \
	  echo "   $$(( $$(date +%s) - start )) s"; \
	done

# docs/results.md from the CSVs in figures/ (run after make figures; a test keeps it in step).
report: $(STAMP)
	$(PY) -m icd_lite.experiments.report

# The unit tests, then every notebook under nbval with the small parameters of params/ci.yaml
# (papermill injects them into copies in build/ci-notebooks; the figures go to build/).
test: $(STAMP)
	$(PY) -m icd_lite.notebook_params prepare params/ci.yaml build/ci-notebooks > /dev/null
	ICD_LITE_FIGURES=$(CURDIR)/build/test-figures $(PY) -m pytest tests build/ci-notebooks \
	  --nbval-lax -p no:cacheprovider

# Every notebook with device=cuda and small parameters, the three benches and the CLI, timed:
# for a CUDA machine.
gpu-check: $(STAMP)
	bash tools/gpu_check.sh

# The SD1.5 speed and memory bench (issue 20), for a CUDA machine (TORCH_SPEC="torch"): writes
# SD1.5's full-size architecture with random weights (~4.5 GB, build/sd15-bench/model, once), then
# times one 512x512 edit, iCD against DDIM50 / NPI / NTI + P2P: eager with fused students, as peft
# adapters, and compiled; reports and JSON in build/sd15-bench/. The real files instead:
# make sd15-bench SD15_BENCH_ARGS="--base DIR --teacher DIR --loras DIR" (see the script's header).
sd15-bench: $(STAMP)
	bash tools/sd15_gpu_bench.sh

# Re-pin requirements/lock.txt from the current environment (after changing pyproject.toml):
# the runtime dependencies and both extras.
lock: $(STAMP)
	$(PY) -m pip install --quiet --upgrade -e ".[notebooks,dev,metrics,train]"
	( grep '^#' requirements/lock.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^torch==' ) > requirements/lock.new
	mv requirements/lock.new requirements/lock.txt

clean:
	rm -rf build $(VENV)

# Retrain every shipped weight from scratch: the toy world, then the iCD student pairs.
train: train-world train-students

# The toy world (35-41 min measured on 2 CPU cores); resumes if interrupted. Both cores stay busy:
# CLIP and the VAE train side by side, one core each, and the VAE takes both once CLIP is done;
# then CLIP's image tower on decoded images beside the teacher's first 600 steps, one core each;
# then the teacher finishes as two one-core processes, each on half of every batch (torchrun).
TRAIN_WORLD := $(PY) -m icd_lite.world.train
train-world: $(STAMP)
	@mkdir -p build
	$(TRAIN_WORLD) --stage clip --threads 1 > build/train_clip.log 2>&1 & clip=$$!; \
	$(TRAIN_WORLD) --stage vae --threads 1 --until-step 7000 || exit 1; \
	wait $$clip || { echo "CLIP training failed: see build/train_clip.log"; exit 1; }
	$(TRAIN_WORLD) --stage vae --threads 2
	$(TRAIN_WORLD) --stage clip-decoded --threads 1 > build/train_clip_decoded.log 2>&1 & tuned=$$!; \
	$(TRAIN_WORLD) --stage teacher --threads 1 --until-step 600 || exit 1; \
	wait $$tuned || { echo "CLIP fine-tuning failed: see build/train_clip_decoded.log"; exit 1; }
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 \
	  -m icd_lite.world.train --stage teacher --threads 1

# The student pairs of the paper's ablations (recipes A B C E F G G3, see icd_lite/distill.py), one
# after another on the shipped teacher; resumes if interrupted.
train-students: $(STAMP)
	$(PY) -m icd_lite.distill --recipe all --threads 2

# Notebook 06's trained ablations (icd_lite/experiments/ablation_training.py): recipes A, B, C, G
# continued to 1200 iterations, and the LoRA sweeps of lambda, the guidance set and the boundaries.
# Two one-thread lanes side by side (84 min measured on 2 CPU cores); resumes if interrupted, skips
# what is already trained. Needs the shipped students (train-students).
ABLATIONS := $(PY) -m icd_lite.experiments.ablation_training --threads 1
train-ablations: $(STAMP)
	@mkdir -p build
	$(ABLATIONS) --run lane1 > build/train_ablations_lane1.log 2>&1 & lane1=$$!; \
	$(ABLATIONS) --run lane0 || exit 1; \
	wait $$lane1 || { echo "lane 1 failed: see build/train_ablations_lane1.log"; exit 1; }
