"""plateflow: a Prefect 3 workflow for characterising, embedding and smart-cropping plates."""

__version__ = "0.1.0"
