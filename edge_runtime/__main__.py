"""``python -m edge_runtime predict ...`` on an edge box (no ``defectkit`` package needed)."""
import sys

from edge_runtime.cli import main

sys.exit(main())
