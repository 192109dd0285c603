"""Integrations with other libraries; ``deepspeed_zero`` is the only module that reads DeepSpeed internals."""
