"""The CPU stage: one decode per plate feeds its metadata, colour histograms, quality scores,
preview and working copy.

- ``step``: the step's key, ``characterize_image`` (the plain function) and the per-plate work;
- ``metadata``, ``histograms``, ``quality``, ``viz``, ``working_copy``: what one decode yields;
- ``save``: the plate's files (input_image.json, input_color_histograms.json, viz/, the working
  copy) and its failure record.

The Prefect task around it is ``tasks/characterize.py``; the flow that settles current plates
and batches the rest is ``flows/characterize.py``.
"""
