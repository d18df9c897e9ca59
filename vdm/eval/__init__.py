"""Sample-quality metrics and the eval.py command."""
