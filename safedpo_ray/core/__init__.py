"""Pure math: the preference losses, log-prob extraction, one forward and its metrics. No Ray, no DeepSpeed."""
