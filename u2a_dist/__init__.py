"""u2a-dist: distributed Unlearning-to-Align (U2A) on DeepSpeed ZeRO-3 and Ray."""

__version__ = "0.1.0"
