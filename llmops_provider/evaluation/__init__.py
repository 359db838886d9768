"""Evaluation-gate building blocks shared by the operator (control plane) and the eval job.

Pure stdlib + pydantic: ``bootstrap`` (paired bootstrap comparison against the champion),
``safety`` (red-team prompt set and its scorer), ``report`` (the self-contained HTML report).
"""
