"""Training on Ray Train: the driver (`driver`), resources (`resources`), the per-worker loop (`loop`) and what it
calls on a schedule (`validation`, `progress`), learning-rate schedules (`schedules`)."""
