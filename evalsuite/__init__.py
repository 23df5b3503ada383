"""Evaluation (`cli.py eval`): the SCAN test splits, fast shared-support decoding, reports, plots.

splits.py    which splits fit which episode type; SCAN test queries and support sets; --scan_file / --support
decode.py    many queries against one support set: length-bucketed chunks, original order restored
evaluate.py  EvalConfig and evaluate(): checks every input first, then decodes, then writes the report
report.py    results.json, predictions_<split>.jsonl, the summary table (all files written atomically)
plots.py     attention heatmaps (--plot N)

The metrics (exact match, retrieval / generalization, averaged over episodes) are trainer/metrics.py, which
training validation shares.
"""
