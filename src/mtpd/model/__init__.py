from mtpd.model.backbone import Backbone
from mtpd.model.decoder import Decoder, KVCache, TreeAttention
from mtpd.model.mtp import MTPHead, MTPModel

__all__ = ["Backbone", "Decoder", "KVCache", "MTPHead", "MTPModel", "TreeAttention"]
