"""The named scenarios of BENCHMARKS.md, one module each (light, medium and heavy share ``load``)."""
