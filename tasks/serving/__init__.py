"""Model servers the stages start as subprocesses: vLLM on GPUs, ``transformers serve`` as its CPU stand-in.

Shared by the benchmark stage (load against the server) and the evaluate stage (lm-eval's ``local-completions``
against the server on GPU profiles), so both serve a model with the same command and lifecycle.
"""
