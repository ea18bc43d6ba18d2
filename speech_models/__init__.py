"""Speech-augmented LLMs in the style of NVIDIA NeMo speechlm2 (SALM, DuplexS2S), without NeMo.

Modules: `config` (typed model schema), `registry` (config -> model / collator), `perception` (log-mel +
FastConformer + adapter), `salm`, `duplex_s2s*`, `prompts`, `freezing`, `metrics`, `testing` (tiny offline
builders). Nothing heavy is imported here: Ray Data tasks that only collate batches stay light.
"""
