"""Integrations with other libraries; ``deepspeed_zero`` reads the ZeRO optimizer's internals (the
plugin, ``soap_dist.deepspeed``, touches only DeepSpeed's config helpers and op registry)."""
