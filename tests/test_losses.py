import math

import pytest
import torch

from mtpd.config import LossConfig
from mtpd.losses import (head_targets, head_teacher, kl_from_log_probs, mtp_d_loss, top_n_for_mass, top_n_kl,
                         top_n_support)
from conftest import micro_model


def test_head_k_target_is_t_i_plus_k_plus_1_and_teacher_is_main_head_at_i_plus_k():
    window = torch.arange(10)[None]  # t_j = j, inputs t_0..t_8
    main_logits = torch.arange(9)[None, :, None].float()  # main position i carries value i
    for k in range(0, 4):
        T = 9
        targets = head_targets(window, k)
        assert targets.shape[1] == T - k
        assert targets[0].tolist() == [i + k + 1 for i in range(T - k)]
        teacher = head_teacher(main_logits, k)
        assert teacher[0, :, 0].tolist() == [float(i + k) for i in range(T - k)]
        # the teacher at i+k predicts t_{i+k+1}: the same token as head k at i
        assert head_targets(window, 0)[0, k:].tolist() == targets[0].tolist()


def test_model_head_outputs_align_with_targets():
    model = micro_model(heads=3)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20))
    h0, hidden = model(tokens)
    window = torch.cat([tokens, tokens[:, :1]], dim=1)
    for k, hk in enumerate(hidden, start=1):
        assert hk.shape[1] == head_targets(window, k).shape[1] == 20 - k


def test_head_k_only_sees_tokens_up_to_i_plus_k():
    """Changing t_{i+k+1} (head k's target at i) must not change head k's output at i."""
    torch.manual_seed(1)
    model = micro_model(heads=3)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 16))
    _, hidden = model(tokens)
    i = 5
    for k, hk in enumerate(hidden, start=1):
        changed = tokens.clone()
        changed[0, i + k + 1] = (changed[0, i + k + 1] + 1) % model.cfg.vocab_size
        _, hidden2 = model(changed)
        assert torch.allclose(hk[0, : i + 1], hidden2[k - 1][0, : i + 1])
        assert not torch.allclose(hk[0, i + 1], hidden2[k - 1][0, i + 1])


def test_kl_is_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    teacher = torch.randn(3, 7, 50)
    for direction in ("forward", "reverse"):
        assert top_n_kl(teacher.clone(), teacher, direction=direction).abs() < 1e-6
        assert top_n_kl(torch.randn(3, 7, 50), teacher, direction=direction) > 1e-3
        support = top_n_support(teacher, 10)
        assert top_n_kl(teacher.clone(), teacher, support, direction=direction).abs() < 1e-6


def test_kl_matches_hand_computed_value():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    r = torch.tensor([[0.5, 0.25, 0.25]])
    expected_forward = sum(a * math.log(a / b) for a, b in zip(q[0].tolist(), r[0].tolist()))
    expected_reverse = sum(b * math.log(b / a) for a, b in zip(q[0].tolist(), r[0].tolist()))
    assert kl_from_log_probs(q.log(), r.log(), "forward").item() == pytest.approx(expected_forward, rel=1e-5)
    assert kl_from_log_probs(q.log(), r.log(), "reverse").item() == pytest.approx(expected_reverse, rel=1e-5)


def test_top_n_at_or_above_vocab_equals_full_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    full = top_n_kl(student, teacher, None)
    for n in (30, 31, 1000):
        assert top_n_support(teacher, n) is None
        assert torch.equal(top_n_kl(student, teacher, top_n_support(teacher, n)), full)
    # an explicit support over every index (any order) gives the same value
    everything = teacher.argsort(-1, descending=True)
    assert torch.allclose(top_n_kl(student, teacher, everything), full, atol=1e-6)


def test_top_n_renormalises_both_distributions_over_teacher_top_n():
    teacher = torch.tensor([[[3.0, 2.0, 1.0, -5.0]]])
    student = torch.tensor([[[0.0, 0.0, 9.0, 9.0]]])
    support = top_n_support(teacher, 2)  # indices 0, 1
    assert sorted(support.flatten().tolist()) == [0, 1]
    # over {0, 1} the student is uniform and the teacher is softmax([3, 2])
    q = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    expected = (q * (q.log() - math.log(0.5))).sum()
    assert top_n_kl(student, teacher, support).item() == pytest.approx(expected.item(), rel=1e-5)


def test_top_n_for_mass_picks_smallest_covering_n():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert top_n_for_mass(logits, 0.5) == 1
    assert top_n_for_mass(logits, 0.79) == 2
    assert top_n_for_mass(logits, 0.9) == 3
    assert top_n_for_mass(logits, 1.0) == 4


def _kl_only_grads(stop_grad: bool):
    torch.manual_seed(0)
    model = micro_model(heads=2).train()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 17))
    inputs = tokens[:, :-1]
    h0 = model.main(inputs)
    main_logits = model.main.logits(h0)
    # heads read a detached h0 and embeddings: the only path from the loss to the main blocks is the teacher
    hidden, embeddings, head_logits = h0.detach(), model.main.embed(inputs).detach(), []
    T = inputs.shape[1]
    for k, head in enumerate(model.heads, start=1):
        hidden = head(hidden[:, :T - k], embeddings[:, k:], model.rotary.causal_span(T - k))
        head_logits.append(model.draft_logits(k, hidden))
    cfg = LossConfig(alpha_lambda=0.0, beta=1.0, main_weight=0.0, stop_grad=stop_grad, top_n=50)
    terms = mtp_d_loss(tokens, main_logits, head_logits, cfg)
    terms.total.backward()
    main_blocks = [p for n, p in model.main.named_parameters() if n.startswith("blocks")]
    return main_blocks, list(model.heads.parameters())


def test_stop_gradient_gives_main_model_no_gradient_from_kl():
    main_params, head_params = _kl_only_grads(stop_grad=True)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in main_params)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in head_params)


def test_without_stop_gradient_kl_reaches_main_model():
    main_params, _ = _kl_only_grads(stop_grad=False)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in main_params)


def test_beta_zero_is_plain_mtp_and_weights_follow_paper_defaults():
    torch.manual_seed(0)
    V = 40
    window = torch.randint(0, V, (2, 9))
    main_logits = torch.randn(2, 8, V)
    head_logits = [torch.randn(2, 8 - k, V) for k in range(1, 5)]
    plain = mtp_d_loss(window, main_logits, head_logits, LossConfig(beta=0.0))
    assert all(kl.item() == 0 for kl in plain.head_kl)
    expected = plain.main_ce + sum(0.3 / 4 * ce for ce in plain.head_ce)
    assert torch.allclose(plain.total, expected)
    full = mtp_d_loss(window, main_logits, head_logits, LossConfig())  # beta default 0.5 with 4 heads
    assert torch.allclose(full.total, expected + 0.5 * sum(full.head_kl))
    assert LossConfig().resolved_beta(1) == 1.0 and LossConfig().resolved_beta(4) == 0.5


@pytest.mark.parametrize("top_n,temperature,direction", [(None, 1.0, "forward"), (6, 1.0, "forward"),
                                                         (6, 2.0, "reverse"), (None, 0.5, "reverse")])
def test_objective_kl_per_head_is_top_n_kl_towards_the_shifted_main_head(top_n, temperature, direction):
    """mtp_d_loss computes the teacher's distribution once and slices it per head; each head's term must be
    top_n_kl against the main head at i + k over that teacher's own top-N (the definition, docs/design.md §2)."""
    torch.manual_seed(0)
    V = 30
    window = torch.randint(0, V, (2, 11))
    main_logits = torch.randn(2, 10, V)
    head_logits = [torch.randn(2, 10 - k, V) for k in range(1, 4)]
    cfg = LossConfig(beta=0.5, top_n=top_n, temperature=temperature, kl_direction=direction)
    terms = mtp_d_loss(window, main_logits, head_logits, cfg)
    for k, (logits, kl) in enumerate(zip(head_logits, terms.head_kl), start=1):
        teacher = head_teacher(main_logits, k)
        expected = top_n_kl(logits, teacher, top_n_support(teacher, top_n), temperature, direction)
        assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
