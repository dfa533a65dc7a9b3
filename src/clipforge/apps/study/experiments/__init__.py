"""The experiments of ``clipforge study``, one module each, in the paper's order in
``clipforge.apps.study.registry``. Each imports the framework (and the figure helpers), never another."""
