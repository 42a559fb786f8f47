# CoDETR-d2. `make install` installs what is missing: torch + torchvision, setuptools<81 + wheel,
# detectron2 (pinned commit, or DETECTRON2_SOURCE), this project - see README "Installation".
PYTHON ?= python3
DEMO_CONFIG ?= configs/toy/co_dino_toy.py
DEMO_OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: install test demo clean-demo

# TORCH_INDEX_URL and DETECTRON2_SOURCE reach the script from the environment or `make VAR=...`
install:
	@$(PYTHON) tools/install_prerequisites.py

test:
	@$(PYTHON) tools/install_prerequisites.py --with-test-extras
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

# generate the toy data, train, evaluate (final table), draw predictions on the val images
demo: install
	$(PYTHON) train_net.py --config-file $(DEMO_CONFIG) train.output_dir=$(DEMO_OUTPUT)/train
	$(PYTHON) demo.py --config-file $(DEMO_CONFIG) --input "$${CODETR_DATASETS:-datasets}/codetr_toy/val/*.jpg" \
		--output $(DEMO_OUTPUT)/predictions --confidence-threshold 0.3 \
		train.init_checkpoint=$(DEMO_OUTPUT)/train/model_final.pth

clean-demo:
	rm -rf $(DEMO_OUTPUT)
