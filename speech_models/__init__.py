"""Speech-augmented LLMs in the style of NVIDIA NeMo speechlm2 (SALM, DuplexS2S), without NeMo.

Modules: `registry` (one entry per model type: what the orchestrator needs from it), `config` (typed model
schema) built by `typed_data`, `perception` (log-mel + FastConformer + adapter), `salm`, `duplex_s2s*`,
`codec`, `prompts`, `freezing`, `audio` (resampling), `metrics` (WER/BLEU), `precision`, `pretrained`
(self-contained exports, `from_pretrained`, `init_from_checkpoint`), `nemo_format` (NeMo speechlm2 checkpoint
directories, read and written), `testing` (tiny offline builders). Nothing heavy is imported here: Ray Data tasks
that only collate batches stay light, and nothing here imports the orchestrator.
"""
