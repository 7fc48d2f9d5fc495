"""The learned-optimizer experiments: tasks, baselines, the step-reduction benchmark, runs."""
