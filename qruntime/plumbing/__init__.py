"""Model plumbing shared by every stage: where a model's blocks are and how they are laid out (`model`,
`layouts`), batches, forwards and autocast (`model`), offloading blocks to a device while they run
(`offload`), and the report types every stage fills (`report`).

Imports: nothing from qruntime (torch and transformers only).
"""
