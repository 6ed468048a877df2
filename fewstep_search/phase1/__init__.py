"""Phase-1 as a search (docs/design.md section 2): optimizers x parameterizations x objectives, run as Ray
Tune trials and recorded in an Optuna study.

The math half (`parameterizations`, `problem`, `optimizers`, `trials`, `select`) imports no Ray, and Optuna
only lazily, in the Optuna-sampler optimizers. The adapters are thin and separate:
`engine` (Ray Tune), `record` (the Optuna study), `live` (the rich table), `phase1` (glue to a run directory).
Nothing is imported here, so `import fewstep_search.search` stays cheap.
"""
