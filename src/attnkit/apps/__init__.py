"""The applications: the commands people run (``attnkit show``, ``explain``, ``compare``, ``bench``).

They are built on the library's public API; nothing in the library imports them.

* `cli`: the ``attnkit`` command, wiring up the others.
* `show`: what a real pretrained model attends to (terminal summary, HTML report, PNGs).
* `walkthrough`: ``attnkit explain``, one head of self-attention step by step.
* `compare`: self-attention against an LSTM, and cross-attention, measured on synthetic tasks.
* `bench`: the benchmarks, one module per ``attnkit bench NAME``.
* `harness`: what bench and compare share: fresh-process cases, timing, peak memory, results files.
"""
