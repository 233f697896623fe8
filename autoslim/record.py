"""The record's vocabulary: the names both sides of a study read and write, spelled once.

A trial's ``status`` user attribute says what became of its candidate; study attributes with
these prefixes hold refined results and the workers seen.
"""

from __future__ import annotations

__all__ = [
    "OK",
    "OVER_BUDGET",
    "OVER_LATENCY",
    "SCREENED",
    "REJECTED",
    "REFINED_PREFIX",
    "WORKER_PREFIX",
]

# a trial's status: measured on its artifact; rejected before training by the size estimate
# (budget) or the calibrated latency predictor (max latency); screened by the BN proxy only
OK = "ok"
OVER_BUDGET = "over_budget"
OVER_LATENCY = "over_latency"
SCREENED = "screened"
REJECTED = (OVER_BUDGET, OVER_LATENCY)  # turned away before any training, at almost no cost

REFINED_PREFIX = "refined:"  # study attribute of a refined trial: refined:NNNNN
WORKER_PREFIX = "worker:"  # study attribute of a worker process: worker:HOST:PID
