"""The labeling loop: after each published model version, its predictions for every unlabelled task are written into
Label Studio (chunked, resumable), the project's model version is pinned, tasks are ranked for labeling and old
versions' predictions are cleaned up.

``schedule.after_publish`` (called by the training job) queues ``job.prelabel_project`` on an RQ worker, or runs
``writer.run_prelabel`` in the embedded trainer's process; ``progress`` is the record and resume cursor,
``live`` computes the predictions from the embedding cache, ``order`` the labeling order and the "label next" tab.
"""
