"""The names of the quality flags (cleanvision's issue names) and of the scores they come from:
what the characterization writes, the corpus table holds and the report shows."""

PLATE_FLAGS = ("dark", "light", "low_information", "blurry", "odd_aspect_ratio", "grayscale")  # each plate's own
CORPUS_FLAGS = ("odd_size", "exact_duplicates", "near_duplicates")  # decided over the whole corpus
FLAGS = PLATE_FLAGS + CORPUS_FLAGS
SCORES = ("brightness", "foreground_brightness", "paper_luminance", "foreground_share", "entropy",
          "edge_width", "tint_spread")  # plates.parquet's quality_scores
