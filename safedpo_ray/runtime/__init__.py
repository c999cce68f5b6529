"""The runtime: the Ray connection, the console, run storage by URI, secrets, safe loading of weights."""
