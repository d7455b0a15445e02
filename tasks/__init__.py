"""tvmflow steps: plain functions, one module per pipeline step."""

import os

# oneDNN's OpenMP threads must sleep between calls, not spin against TVM's thread pool (measured:
# EfficientNet-Lite0 15 ms passive vs 180 ms spinning on 2 cores; tasks/build/cpu_vendor.py). An
# OpenMP runtime reads this once, when it loads, so it is set before anything here loads one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
