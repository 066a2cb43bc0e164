"""Worker processes of a run: actors, critics, rollout engines, reward models and reward managers."""
