"""
The dispatcher's benchmark: C{.venv/bin/python bench/run.py}.  Nothing here
is part of the product or of its test suite.
"""
