"""soap_dist: SOAP (Adam in the eigenbasis of Shampoo's preconditioner) for PyTorch, built to scale."""

from soap_dist.optimizer import SOAP

__all__ = ["SOAP"]
__version__ = "0.1.0"
