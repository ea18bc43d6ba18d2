"""Ray-native training and sweep orchestrator for speech-augmented LLMs (SALM, duplex S2S)."""

__version__ = "0.1.0"
