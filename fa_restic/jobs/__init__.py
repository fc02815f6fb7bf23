"""The job layer: records, their state machine, the scheduler and the work itself."""
