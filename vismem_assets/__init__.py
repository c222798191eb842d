"""vismem: a lifelong visual memory (see /DESIGN.md).

Importing the package has no side effects: the BLAS set-up (blas.py) and the settings
(settings.py) are the entry points' first step, `settings.setup()`, before numpy or faiss load.
"""
