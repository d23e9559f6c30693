"""Recipes: `CompressConfig`, composed of each algorithm's own config, and the preset names users type,
read by a small parser (`config`).

Imports: each algorithm's config (`qruntime.quant`, `qruntime.distill`, `qruntime.sparse`) and `qruntime.nn`
(the default exclusions).
"""
