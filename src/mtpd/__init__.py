"""mtpd: multi-token prediction heads trained by self-distillation, and lossless self-speculative decoding."""

__version__ = "0.1.0"
