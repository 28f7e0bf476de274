"""Tier 2, the data both frameworks read: datasets, image files and class names. No framework.

    datasets     digits (bundled with scikit-learn) and tensorflow-datasets, as NumPy batches
    folders      your own images: class folders, split folders, .csv/.jsonl lists, on the same pipeline
    images       image files to model input, the official way
    class_names  the class names of a head: bundled lists (labels/) or a user's file
"""
