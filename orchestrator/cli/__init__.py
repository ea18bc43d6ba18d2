"""The `speechlm` command (also `python -m orchestrator`): `main` parses and dispatches, one module per command
group (`data`, `sweep`, `models` for eval/infer/export), `common` holds exit codes."""
