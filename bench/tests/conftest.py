"""The test suite's fixtures these tests use: the demo dataset (built once per session), seeded RNG."""
from tests.conftest import _seed  # noqa: F401  (autouse: every test starts from torch.manual_seed(0))
from tests.train.conftest import demo_data  # noqa: F401
