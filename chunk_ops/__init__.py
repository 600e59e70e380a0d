"""chunk_ops: run 3D ConvNets over huge precomputed volumes, chunk by chunk, seamlessly.

The worker package: geometry, job specs, volume I/O, engines, the two-stage
blend and the CLI.  It never imports Airflow.
"""

__version__ = "0.1.0"
