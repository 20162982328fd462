"""Data only: the code specialist `specialist-router demo` registers and deploys on first run (see `cli/demo.py`).

A package so that its files ship as package data: `adapter_config.json` and `adapter_model.safetensors` (the PEFT
folder made by `specialist-router train`), `registry-manifest.json` (the manifest its training run's registry wrote:
base and data fingerprints, gate metrics, file hashes), `report.json` (the run's report); `loss.png` and
`REPRODUCE.md` (the exact commands that re-create it) are in the repository.
"""
