"""The GPU step: embed every plate's crop candidates with one model, in batches across plates.

One module per part, as clip-retrieval's inference is built:

- ``models``: the capability table's model, with its weights found or a clear error;
- ``surgery``: inference-only rewrites of a loaded model (LayerScale folded, GELU fused);
- ``reader``: threads that read each working copy (its JPEG bytes, or decoded by Pillow);
- ``mapper``: ``ViewEncoder``, the only code that touches the device: decode, cut and
  letterbox every view of a batch of plates, then one forward pass serves them all;
- ``writer``: the content-addressed vector store, one .npy per plate and model;
- ``runner``: composes reader, mapper and writer and times each (its Prefect task, embed-chunk,
  is ``tasks/embed.py``);
- ``candidates``: the crop candidates whose views are embedded (crop_candidates.json).

The model is built inside the process that uses it, never at import time and never passed
through a Prefect cache key. Nothing here imports torch until it runs.
"""
