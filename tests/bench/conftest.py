"""Tests of the benchmark helpers in bench/ (imported as top-level modules)."""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench")))
