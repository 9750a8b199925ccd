import sys
from pathlib import Path

# Tests import the project from the checkout (also when it is installed editable).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
pytest_plugins = ["tests.fixtures"]
