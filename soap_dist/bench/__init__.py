"""Step-time benchmark for soap_dist.SOAP (run it with ``python -m soap_dist.bench``).

It times torch AdamW, a plain per-tensor SOAP (``PlainSOAP``), soap_dist.SOAP and a *floor* (the
matmuls a SOAP step cannot avoid, batched by shape, plus one AdamW pass) on GPT-2 parameter sets,
so that the optimizer's overhead can be read as a ratio to what any SOAP step must pay.
"""

from soap_dist.bench.floor import Floor
from soap_dist.bench.param_sets import ParamSpec, count_factors, gpt2_specs
from soap_dist.bench.plain_soap import PlainSOAP

__all__ = ["Floor", "ParamSpec", "PlainSOAP", "count_factors", "gpt2_specs"]
