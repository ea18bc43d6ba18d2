"""Data: demo asset synthesis, Lhotse Shar tooling and the Ray Data pipeline that feeds training."""
