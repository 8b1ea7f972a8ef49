"""Segmentation from patch features: plates cut into overlapping windows whose encoder patch
tokens are cached in float16 (``patches``), curators' masks (``masks``), a light per-token head
trained on the tokens and scored on held-out plates (``train``), and masks stitched at full
resolution in strips (``stitch``, ``predict``).

The Prefect task is ``tasks/patches.py``; the flows are in ``flows/segment.py``.
"""
