"""Registry of LoRA specialists: versions per task, aliases, validation (see docs/adapters.md).

Public API: `adapters.registry.Registry`, `adapters.registry.AdapterVersion`,
`adapters.validation.validate_adapter`; CLI in `adapters.cli`.
"""
