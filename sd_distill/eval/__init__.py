"""Evaluation: the base with CFG beside the distilled model on the same prompts and seeds.

``compare`` runs it (``config`` -> ``pipelines`` -> ``render`` -> ``scores`` -> ``report``); ``grid``
draws the captioned grid, ``metrics`` the image metrics, ``prompts`` the prompt lists and file names.
"""
