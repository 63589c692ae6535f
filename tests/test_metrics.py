import pytest

from mtpd.metrics import acceptance_rates, cumulative_acceptance, mean_accepted_tokens


def test_metrics_from_scripted_acceptances():
    # 5 steps with 3 drafts each, accepted counts:
    accepted = [0, 3, 1, 2, 3]
    # AR_1: 4 of 5 steps accepted draft 1; AR_2: of those 4, 3 accepted draft 2; AR_3: of those 3, 2.
    assert acceptance_rates(accepted, 3) == pytest.approx([4 / 5, 3 / 4, 2 / 3])
    assert cumulative_acceptance(accepted, 3) == pytest.approx([4 / 5, 3 / 5, 2 / 5])
    assert mean_accepted_tokens(accepted) == pytest.approx(1 + 9 / 5)
    # CAR_k is the product of AR_1..AR_k
    rates = acceptance_rates(accepted, 3)
    assert cumulative_acceptance(accepted, 3)[2] == pytest.approx(rates[0] * rates[1] * rates[2])


def test_acceptance_rate_only_counts_steps_that_proposed_the_draft():
    # dynamic draft length: (accepted, drafted) per step
    accepted, drafted = [1, 1, 2, 0, 3], [1, 3, 2, 3, 3]
    # draft 2 was reached (draft 1 accepted and draft 2 proposed) in steps 2, 3, 5: accepted in 3 and 5
    # draft 3 was reached in steps 5 only (step 3 stopped at 2 drafts)
    assert acceptance_rates(accepted, 3, drafted) == pytest.approx([4 / 5, 2 / 3, 1 / 1])
    assert cumulative_acceptance(accepted, 3) == pytest.approx([4 / 5, 2 / 5, 1 / 5])
