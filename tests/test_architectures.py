"""The architecture sweep (tests/arch_sweep.py): every causal-LM architecture of the installed
transformers that the locator accepts records exactly what a plain forward with hooks gives."""
import pytest
import transformers

from tests.arch_sweep import REQUIRED, causal_lm_types, check, documented_passing


@pytest.fixture(scope="module")
def outcomes():
    return {o.model_type: o for o in map(check, causal_lm_types())}


def test_every_accepted_architecture_records_exactly(outcomes):
    failing = {t: o.reason for t, o in outcomes.items() if o.status == "fails"}
    assert not failing, failing
    passed = sorted(t for t, o in outcomes.items() if o.status == "passes")
    assert len(passed) >= 30, passed
    missing = [t for t in REQUIRED if t not in passed]
    assert not missing, {t: outcomes[t] for t in missing}


def test_refusals_say_why(outcomes):
    refused = [o for o in outcomes.values() if o.status == "refused"]
    assert refused and all(len(o.reason) > 20 for o in refused)
    assert "mixture of experts" in outcomes["mixtral"].reason


def test_the_documented_list_is_the_sweeps(outcomes):
    version, documented = documented_passing()
    if version != transformers.__version__:
        pytest.skip(f"docs/architectures.md was generated with transformers {version}, this is "
                    f"{transformers.__version__}; regenerate with `python -m tests.arch_sweep --write`")
    assert documented == {t for t, o in outcomes.items() if o.status == "passes"}
