"""Airflow pieces for chunk_ops runs, in the provider shape.

hooks/chunk_queue.py    the task queue of a run (SqsHook connection for sqs://)
operators/chunk_queue.py  enqueue a stage's tasks
sensors/chunk_queue.py    wait until a stage is done (defers to the trigger)
triggers/chunk_queue.py   polls the queue and the done markers without blocking
utils/                  Params from the job-spec schema; worker pod settings
"""
