"""Model evaluation: ``python -m synthsr_bids.evaluation`` (see ``benchmarks/README.md``).

``metrics``, ``degrade`` and ``baselines`` are pure numpy/scipy image maths; ``cases`` builds the
synthetic (training generator, torch) and patient cases; ``run`` synthesises and scores them;
``report`` formats the table and the JSON document.
"""
