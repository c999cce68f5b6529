"""`python -m safedpo_ray.cli ...` is the `safedpo-ray` command."""

from safedpo_ray.cli.main import entry

if __name__ == "__main__":
    entry()
