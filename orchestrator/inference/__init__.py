"""Trained models at work: finding and loading them (`sources`), `infer`, `evaluate`, `export`, and the ASR that
scores generated speech (`scoring_asr`)."""
