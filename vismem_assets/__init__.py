"""vismem: a lifelong visual memory (see /DESIGN.md).

Importing the package first decides the BLAS set-up (OPENBLAS_CORETYPE, faiss's BLAS
threshold) before numpy or faiss load their OpenBLAS; see blas.py. It imports nothing heavy.
"""
from . import blas as _blas

_blas.configure()
