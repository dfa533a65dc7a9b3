"""``clipforge study``: the CLIP paper's claims (Radford et al. 2021) as experiments on the built-in data,
each a function of a ``Study`` returning a ``Result``, and a report of them all (see README.md)."""
from clipforge.apps.study.framework import SCALES, Result, Scale, Study
from clipforge.apps.study.registry import EXPERIMENTS
from clipforge.apps.study.runner import run_study

__all__ = ["EXPERIMENTS", "SCALES", "Result", "Scale", "Study", "run_study"]
