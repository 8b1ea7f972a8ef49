"""plateflow: a Prefect 3 workflow for characterizing, embedding and smart-cropping plates."""

__version__ = "0.1.0"
