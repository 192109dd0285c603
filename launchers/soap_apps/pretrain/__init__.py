"""Pre-training a small GPT-style language model with SOAP (or AdamW) under torchrun or DeepSpeed.

The launcher ``launchers/pretrain.py`` only parses arguments; the pieces live here, one idea per
module: ``config`` (YAML <-> dataclasses), ``model`` (the decoder and its export format), ``data``
(token files, batches per rank), ``optim`` (parameter groups and the
optimizer), ``parallel`` (process group, FSDP2/DDP/HSDP wrapping, gradient clipping), ``checkpoint``
(DCP save/resume), ``metrics`` (progress bar, JSONL, loss plot), ``trainer`` (the loop) and
``ds_backend`` (the same loop's steps under DeepSpeed). The lr schedule (warmup + cosine) is
``soap_apps.schedule``, shared with fine-tuning. See docs/pretrain.md.
"""
