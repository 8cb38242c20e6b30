"""The GPU device check (bench/device_check.sh): one module per part, driven by bench/gpu_check.py.

Parts, in the order the shell script runs them (most important first): env, tests, parity, goal,
sync, sanitize, timings, roofline. Each writes its log, tables and CSV files under the output
folder and a ``<part>.summary.json`` that the final summary reads. docs/device_check.md says what
each part shows and how long it takes on an H200.
"""
