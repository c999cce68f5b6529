"""The `safedpo-ray` command line: the verbs, and cluster jobs through the Ray Jobs API."""
