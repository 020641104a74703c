"""``python bench/benchmark.py ...`` is ``python -m bench.run ...`` (the name the issue gives the load generator)."""

from bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
