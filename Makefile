# The two commands of the README. Both create or reuse the virtual environment first.
SHELL := /bin/bash
.PHONY: demo test install

install:
	@bash scripts/install.sh >/dev/null

demo:
	@VENV=$$(bash scripts/install.sh) && "$$VENV/bin/defectkit" demo --out demo_out

test:
	@VENV=$$(bash scripts/install.sh) && bash scripts/host_deps.sh && "$$VENV/bin/python" -m pytest -q tests
