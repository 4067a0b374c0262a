"Fixtures shared by the test files."
import signal

import pytest

# A shell starts background jobs with Ctrl-C ignored, and child processes inherit that; the Ctrl-C tests need it live
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def fresh_accelerate():
    "accelerate keeps one process-wide state; reset it so each test can pick its own settings."
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True); GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True); GradientState._reset_state()
