from mtpd.model.decoder import Decoder, KVCache, Span
from mtpd.model.mtp import MTPHead, MTPModel

__all__ = ["Decoder", "KVCache", "MTPHead", "MTPModel", "Span"]
