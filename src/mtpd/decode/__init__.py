from mtpd.decode.acceptance import Greedy, SpeculativeSampling, make_rule, sampling_probs
from mtpd.decode.autoregressive import autoregressive_generate
from mtpd.decode.chain import ChainDrafter
from mtpd.decode.generation import Generation
from mtpd.decode.speculative import speculative_generate

__all__ = ["ChainDrafter", "Generation", "Greedy", "SpeculativeSampling", "autoregressive_generate", "make_rule",
           "sampling_probs", "speculative_generate"]
