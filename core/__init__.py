"""Chest X-ray pneumonia workbench: datasets, models, training, evaluation and prediction.

A library: no Streamlit, no global state. The dashboard and the `python -m core` CLI both call it.
"""

__version__ = "0.1.0"
