"""opens2s-edge: OpenS2S speech-to-speech on edge GPUs."""

__version__ = "0.1.0"
