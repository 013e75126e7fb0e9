"""The run's report: one static HTML page built from the manifest and the stages' files."""
