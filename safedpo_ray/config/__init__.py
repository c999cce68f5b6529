"""Configuration: typed dataclasses per command, loaded from YAML with `a.b=value` overrides; the rules every key is checked against."""
