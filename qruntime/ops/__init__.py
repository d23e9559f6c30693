"""The ops: one `torch.library.custom_op` per format (`registry`), the pure-PyTorch reference every
kernel is tested against (`reference`), the C++ CPU extension glue (`extension`, the compiled `_C`) and
the registration of the Triton kernels as the CUDA implementations (`triton_backend`; the kernels live in
`qruntime.kernels`).

Imports: `qruntime.formats`. Importing touches no CUDA and compiles nothing.
"""
