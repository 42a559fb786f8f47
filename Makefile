# CoDETR-d2. Prerequisites (not installed here): torch, torchvision, detectron2 - see README.
PYTHON ?= python3
DEMO_CONFIG ?= configs/toy/co_dino_toy.py
DEMO_OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: prerequisites install test demo clean-demo

prerequisites:
	@$(PYTHON) tools/check_prerequisites.py

# the project itself and its own dependencies (fvcore, scipy, pycocotools, opencv), once
install: prerequisites
	@$(PYTHON) -c "import codetr, fvcore, scipy, pycocotools, cv2" 2>/dev/null || \
		$(PYTHON) -m pip install --no-build-isolation -e .

test: install
	@$(PYTHON) -c "import pytest, timm" 2>/dev/null || $(PYTHON) -m pip install pytest timm
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

# generate the toy data, train, evaluate (final table), draw predictions on the val images
demo: install
	$(PYTHON) train_net.py --config-file $(DEMO_CONFIG) train.output_dir=$(DEMO_OUTPUT)/train
	$(PYTHON) demo.py --config-file $(DEMO_CONFIG) --input "$${CODETR_DATASETS:-datasets}/codetr_toy/val/*.jpg" \
		--output $(DEMO_OUTPUT)/predictions --confidence-threshold 0.3 \
		train.init_checkpoint=$(DEMO_OUTPUT)/train/model_final.pth

clean-demo:
	rm -rf $(DEMO_OUTPUT)
