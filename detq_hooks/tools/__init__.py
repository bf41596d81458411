"""Around the library, not part of it: the synthetic detection data set (``tools.data``), cached float
reference models for the benchmarks (``tools.zoo``) and the quick start's ``detq demo`` (``tools.demo``).
They may import trainers; the core never imports them."""
