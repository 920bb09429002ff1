import pytest

from fuzz_runner import Pool

_pool = None


@pytest.fixture(scope="session")
def fuzz_pool():
    global _pool
    _pool = Pool(timeout=60.0)
    yield _pool
    _pool.close()


def pytest_terminal_summary(terminalreporter):
    if _pool is not None and _pool.counts:
        terminalreporter.write_sep("-", "fuzz draws per op (tests/fuzz)")
        terminalreporter.write_line(_pool.table())
