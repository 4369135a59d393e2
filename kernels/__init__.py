"""Triton kernels of fastbert, installed as ``fastbert.kernels``.

This file stays free of imports and side effects: from the repository root ``import kernels``
finds this folder, and a widely used library of that name must not be shadowed by anything here.
"""
