"""Analysis: run records -> the paper's tables and figures (``python analysis/make_tables.py``).

``frame`` loads records (or W&B runs) into one DataFrame, ``tables`` and ``figures`` hold one
function per artefact, ``output`` writes them with the list of records each one used.
"""
