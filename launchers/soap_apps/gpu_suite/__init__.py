"""The prepared GPU run of issue 11 (``launchers/gpu_suite.py``): its pieces, one idea per module.

``settings`` (paths, the issue's targets, time budgets, smoke sizes), ``running`` (commands under a
deadline), ``results`` (reading metrics.jsonl and the bench JSONs), ``summary`` (the table of target
vs measured), ``header`` (card, torch, commit, date), ``context`` (what a part is handed), and one
module per part: ``refresh_pieces`` (r), ``step_bench`` (a), ``training_loop`` (b), ``race`` (c).
The launcher parses arguments and runs the parts in turn.
"""
