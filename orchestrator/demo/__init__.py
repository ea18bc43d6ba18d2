"""Synthesised data, apart from the production data pipeline: the demo corpus (`grammar`), eSpeak NG speech
(`synth`), the demo assets (`assets`), and tone-and-noise Shar sets for tests and benchmarks (`synthetic_shar`)."""
