"Fixtures shared by the test files."
import pytest


@pytest.fixture
def fresh_accelerate():
    "accelerate keeps one process-wide state; reset it so each test can pick its own settings."
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True); GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True); GradientState._reset_state()
