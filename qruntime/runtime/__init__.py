"""Fast generation with a compressed (or float) causal LM on the CPU: the decoder.

`architecture` reads a Hugging Face model into the decoder's description of it (which modules make a
block, its norms, attention and activation), or refuses it with the reason; `projection` binds one
linear layer (fused q/k/v and gate/up where their formats allow) to the step's buffers; `decoder` holds
the KV cache and runs prefill (M tokens, PyTorch ops and the modules' kernels) and decoding steps (one
token: one native call on preallocated buffers), and `generate` is generation (greedy or sampled)
with a stated fallback to Hugging Face's ``generate`` for the models it does not read.

Imports: `qruntime.nn`, `qruntime.ops`.
"""
from .architecture import Architecture, UnsupportedModelError, read_architecture
from .decoder import Decoder, generate

__all__ = ["Architecture", "UnsupportedModelError", "read_architecture", "Decoder", "generate"]
