"""The architecture sweep (tests/arch_sweep.py): every causal-LM architecture of the installed
transformers that the locator accepts records, in memory and streamed from its safetensors files,
exactly what a reference that finds the FFN without the locator gives (tests/reference.py).
tests/test_arch_checks.py plants bugs the sweep's checks must catch."""
import warnings

import pytest
import transformers

from tests.arch_sweep import REQUIRED, causal_lm_types, check, compare_with_doc, documented


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
    assert "transforms the neurons before the output projection" in outcomes["bitnet"].reason  # ffn_sub_norm


def test_the_documented_list_is_the_sweeps(outcomes):
    """Against the installed transformers, whichever it is: an architecture both docs/architectures.md and
    the sweep know has the same outcome in both; one only either side knows is reported, not failed."""
    version, doc = documented()
    changed, new, gone = compare_with_doc(doc, {t: o.status for t, o in outcomes.items()})
    if new or gone:
        warnings.warn(f"docs/architectures.md (transformers {version}) and the installed transformers "
                      f"{transformers.__version__} know different architectures: new here {new}, only in the "
                      f"document {gone}; regenerate it with `python -m tests.arch_sweep --write`", stacklevel=1)
    assert not changed, (f"outcomes differ from docs/architectures.md (transformers {version}; installed "
                         f"{transformers.__version__}), as (documented, now): {changed}; regenerate it with "
                         "`python -m tests.arch_sweep --write` if the change is intended")
