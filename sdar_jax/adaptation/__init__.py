"""AR -> SDAR adaptation of a real trained model (SmolLM2-135M-Instruct), end to end.

  experiment.py   the steps of `launch/adapt_smollm2.py`: weights, mask token,
                  corpus, the AR and SDAR training stages, held-out loss and
                  task decoding of every model, results.json + report.md
  report.py       the markdown report of a finished run

Import from the modules (`from sdar_jax.adaptation import experiment`).
"""
