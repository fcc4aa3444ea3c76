"""Tests of the paper's training programs in python/ (imported as the `paper` package)."""

import os
import sys

PYTHON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
sys.path.insert(0, os.path.abspath(PYTHON_DIR))
