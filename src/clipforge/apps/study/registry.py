"""The experiments of ``clipforge study``, by name, in the paper's order (which numbers the report's sections).

Only the study's entry points read this table (the package, ``clipforge.apps.study.runner.run_study``
and ``clipforge study``); an experiment is a function of a
``clipforge.apps.study.framework.Study`` returning a ``clipforge.apps.study.framework.Result``.
"""
from __future__ import annotations

from typing import Callable

from clipforge.apps.study.experiments.few_shot import few_shot
from clipforge.apps.study.experiments.objectives import objectives
from clipforge.apps.study.experiments.projection import projection
from clipforge.apps.study.experiments.prompts import prompts
from clipforge.apps.study.experiments.robustness import robustness
from clipforge.apps.study.experiments.scaling import scaling
from clipforge.apps.study.experiments.temperature import temperature
from clipforge.apps.study.experiments.text_encoder import text_encoder
from clipforge.apps.study.framework import Result, Study

EXPERIMENTS: dict[str, Callable[[Study], Result]] = {
    "objectives": objectives,
    "projection": projection,
    "temperature": temperature,
    "text-encoder": text_encoder,
    "prompts": prompts,
    "few-shot": few_shot,
    "robustness": robustness,
    "scaling": scaling,
}
