import pytest
import torch

from mtpd.decode import autoregressive_generate, speculative_generate
from mtpd.decode.acceptance import Greedy
from mtpd.decode.chain import ChainDrafter
from mtpd.decode.generation import make_batch
from mtpd.decode.speculative import advance, prefill
from mtpd.decode.tree import TreeShape, accept_path, ancestor_matrix, path_nodes, tree_attention_mask
from mtpd.decode.tree_draft import DynamicTree, StaticTree
from mtpd.errors import MtpdError
from mtpd.model import Decoder, MTPModel, TreeAttention
from conftest import (assert_greedy_lossless, assert_samples_like_the_main_model, markov_tokens, micro_model,
                      prompts_from)

SHAPES = {
    "chain": "0 0.0 0.0.0 0.0.0.0",
    "sparse": "0 1 0.0 0.1 1.0 0.0.0 0.0.0.0",
    "wide": "0 1 2 0.0 1.0 2.0 0.0.0",
    "deep-branching": "0 1 0.0 0.1 1.0 1.1 0.0.0 0.0.1 0.1.0 0.0.0.0 0.0.0.1",
}


def drafters():
    return [*(StaticTree(TreeShape.parse(spec)) for spec in SHAPES.values()),
            DynamicTree(depth=4, width=2, children=2, nodes=8), DynamicTree(depth=3, width=3, children=3, nodes=6)]


# ---- pure functions ---------------------------------------------------------------------------------------

def test_tree_shape_from_rank_paths():
    shape = TreeShape.parse("1 0 0.0 0.1 0.0.0")
    assert shape.paths == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert shape.parents() == [-1, 0, 0, 1, 1, 3]
    assert shape.depths() == [0, 1, 1, 2, 2, 3]
    assert shape.num_nodes == 6 and shape.depth == 3
    assert TreeShape.parse(shape.spec()) == shape
    assert TreeShape.chain(3).spec() == "0 0.0 0.0.0"
    with pytest.raises(MtpdError, match="no parent"):
        TreeShape.parse("0 1.0")
    with pytest.raises(MtpdError, match="rank paths"):
        TreeShape.parse("0 a")


def test_ancestor_matrix_and_tree_mask():
    parents = torch.tensor([-1, 0, 0, 1, 2])
    anc = ancestor_matrix(parents)
    assert anc[3].nonzero().flatten().tolist() == [0, 1, 3]
    assert anc[4].nonzero().flatten().tolist() == [0, 2, 4]
    # two rows with prefixes of 3 and 5 cached slots; the tree sits right after the prefix
    mask = tree_attention_mask(torch.tensor([[3] * 5, [5] * 5]), torch.tensor([3, 5]), anc[None], 10)
    assert mask[0, 3].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 6]
    assert mask[1, 4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    assert not mask[1, :, 10:].any() and mask.shape == (2, 5, 10)


def test_accept_path_takes_the_deepest_verified_node():
    #        0
    #      /   \
    #     1(7)  2(8)
    #     |      |
    #     3(5)  4(6)
    parents = torch.tensor([[-1, 0, 0, 1, 2]])
    anc, depth = ancestor_matrix(parents), torch.tensor([[0, 1, 1, 2, 2]])
    tokens = torch.tensor([[9, 7, 8, 5, 6], [9, 7, 8, 5, 6], [9, 7, 8, 5, 6]])
    targets = torch.tensor([[8, 5, 6, 1, 2],   # root -> 8 (node 2), node 2 -> 6 (node 4): depth 2
                            [7, 4, 0, 1, 2],   # root -> 7 (node 1), node 1 -> 4: no child matches, depth 1
                            [3, 5, 6, 1, 2]])  # nothing matches at depth 1
    best = accept_path(tokens, targets, parents, anc, depth)
    assert best.tolist() == [4, 1, 0]
    assert path_nodes(anc, depth, best, 2).tolist() == [[0, 2, 4], [0, 1, -1], [0, -1, -1]]


def test_tree_sampling_acceptance_is_ancestral_sampling():
    """Per node one sample from the main distribution; the emitted tokens (the accepted path, then the
    deepest node's sample) follow p exactly, whatever the drafted children."""
    g = torch.Generator().manual_seed(0)
    V, R = 4, 40000
    # root (node 0) with children token 0 (node 1) and token 1 (node 2); node 1 has child token 2 (node 3)
    parents = torch.tensor([[-1, 0, 0, 1]])
    anc, depth = ancestor_matrix(parents), torch.tensor([[0, 1, 1, 2]])
    tokens = torch.tensor([[3, 0, 1, 2]]).expand(R, -1)
    p = torch.tensor([[0.4, 0.1, 0.2, 0.3], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    targets = torch.multinomial(p.repeat(R, 1), 1, generator=g).view(R, 4)
    best = accept_path(tokens, targets, parents, anc, depth)
    accepted, path = depth[0, best], path_nodes(anc, depth, best, 2)
    on_path = tokens.gather(1, path.clamp_min(0))
    final = targets.gather(1, best[:, None])[:, 0]
    first = torch.where(accepted >= 1, on_path[:, 1], final)
    second = torch.where(accepted >= 2, on_path[:, 2], final)  # emitted in this step when accepted >= 1

    def chi2(sample, probs):
        counts, expected = torch.bincount(sample, minlength=V).float(), probs * len(sample)
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(first, p[0]) < 16.27  # chi-squared, 3 degrees of freedom, p = 0.001
    assert chi2(second[first == 0], p[1]) < 16.27  # after token 0: node 1's distribution
    assert chi2(second[first == 1], p[2]) < 16.27  # after token 1: node 2's distribution
    assert bool((accepted[first >= 2] == 0).all())


# ---- the model side: tree attention over a cache, compaction --------------------------------------------

def test_tree_attention_over_compacted_cache_equals_recomputation():
    """Every node of a verified tree sees exactly its path; after compacting one path, the cache equals the
    cache of a sequential pass over prefix + path, and decoding continues as from scratch."""
    model = micro_model(heads=1)
    main, V = model.main, model.cfg.vocab_size
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, V, (1, 11), generator=g)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3])
    depth = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    anc = ancestor_matrix(parents)
    tokens = torch.randint(0, V, (1, 7), generator=g)
    n, N = 11, 7
    cache = main.new_cache(1, 32)
    main(prefix, torch.arange(n)[None], cache)
    mask = tree_attention_mask(torch.full((1, N), n), torch.tensor([n]), anc[None], n + N)
    h_tree = main(tokens, n + depth[None], cache, tree=TreeAttention(n + torch.arange(N)[None], mask))
    for j in range(N):
        path = anc[j].nonzero().flatten()
        full = main(torch.cat([prefix, tokens[:, path]], 1))
        assert torch.allclose(h_tree[0, j], full[0, -1], atol=1e-5)
    path = torch.tensor([0, 1, 3, 6])  # accept node 6's path: copy slots n+3, n+6 to n+2, n+3
    cache.copy_slots(n + path[None, 1:], n + torch.arange(1, 4)[None])
    sequence = torch.cat([prefix, tokens[:, path]], 1)
    scratch = main.new_cache(1, 32)
    main(sequence, torch.arange(n + 4)[None], scratch)
    assert torch.allclose(cache.k[:, :, :, :n + 4], scratch.k[:, :, :, :n + 4], atol=1e-5)
    assert torch.allclose(cache.v[:, :, :, :n + 4], scratch.v[:, :, :, :n + 4], atol=1e-5)
    more = torch.randint(0, V, (1, 3), generator=g)
    continued = main(more, torch.arange(n + 4, n + 7)[None], cache)
    assert torch.allclose(continued, main(torch.cat([sequence, more], 1))[:, -3:], atol=1e-5)


def head_reference(model: MTPModel, sequence: torch.Tensor) -> list[torch.Tensor]:
    """Teacher-forced head states h1..hK over one sequence [1, T] (position i of head k reads t_{i+k})."""
    hidden = model.main(sequence)
    embeddings = model.main.embed(sequence)
    T, states = sequence.shape[1], []
    for k, head in enumerate(model.heads, start=1):
        hidden = head(hidden[:, :T - k], embeddings[:, k:], model.rotary.causal_span(T - k))
        states.append(hidden)
    return states


@pytest.mark.parametrize("drafter", drafters(), ids=[*SHAPES, "dynamic-4x2x2", "dynamic-3x3x3"])
def test_head_caches_after_tree_steps_equal_recomputation(uncertain_model, drafter):
    """After each tree step, every head's valid cache prefix and hidden states equal a from-scratch
    teacher-forced pass over the accepted sequence, in every row of a batch."""
    model = uncertain_model
    prompts = prompts_from(markov_tokens(600, seed=5, p_first=0.55), [9, 14, 6, 12])
    batch = make_batch(prompts, 30, model.cfg.max_seq_len, max(5, drafter.max_nodes), torch.device("cpu"))
    state = prefill(model, batch, Greedy(), 4, None)
    accepted_total = 0
    for _ in range(6):
        accepted_total += int(advance(state, drafter.step(state, 50)).sum())
        for b in range(len(prompts)):
            count = int(state.count[b])
            sequence = state.seq[b:b + 1, :count - 1]  # the tokens in the main cache
            reference = [model.main(sequence), *head_reference(model, sequence)]
            for k in range(1, 5):  # deeper heads than the tree do not run: their valid prefix may lag
                valid = int(state.heads.computed[k, b])
                assert valid <= count - 1 - k
                if k <= drafter.depth:
                    assert valid >= count - 1 - k - drafter.depth
                if valid == 0:
                    continue
                scratch = model.new_head_caches(1, 64)[k - 1]
                model.head_step(k, reference[k - 1][:, :valid], torch.arange(valid)[None],
                                sequence[:, k:valid + k], scratch)
                cache = state.heads.caches[k - 1]
                assert torch.allclose(cache.k[:, b, :, :valid], scratch.k[:, 0, :, :valid], atol=1e-4)
                assert torch.allclose(cache.v[:, b, :, :valid], scratch.v[:, 0, :, :valid], atol=1e-4)
                if k < 4:
                    assert torch.allclose(state.heads.hidden[k, b, :valid], reference[k][0, :valid], atol=1e-4)
    assert accepted_total > 0


def assert_head_caches_match_recomputation(model: MTPModel, state) -> None:
    """Every head's valid prefix (computed[k]) of cache entries and hidden states equals a teacher-forced
    pass over the row's confirmed tokens."""
    for b in range(state.seq.shape[0]):
        count = int(state.count[b])
        sequence = state.seq[b:b + 1, :count - 1]  # the tokens in the main cache
        reference = [model.main(sequence), *head_reference(model, sequence)]
        for k in range(1, model.num_heads + 1):
            valid = int(state.heads.computed[k, b])
            assert valid <= count - 1 - k
            if valid == 0:
                continue
            scratch = model.new_head_caches(1, 64)[k - 1]
            model.head_step(k, reference[k - 1][:, :valid], torch.arange(valid)[None], sequence[:, k:valid + k], scratch)
            cache = state.heads.caches[k - 1]
            assert torch.allclose(cache.k[:, b, :, :valid], scratch.k[:, 0, :, :valid], atol=1e-4), (k, b)
            if k < model.num_heads:
                assert torch.allclose(state.heads.hidden[k, b, :valid], reference[k][0, :valid], atol=1e-4), (k, b)


@torch.no_grad()
def test_head_caches_stay_valid_when_deep_heads_skip_steps(uncertain_model):
    """Chain steps that draft with fewer heads than the model has (a draft threshold, the context end) leave the
    deeper heads' caches alone; entries built on drafts rejected meanwhile must not count as valid later."""
    model = uncertain_model
    prompts = prompts_from(markov_tokens(600, seed=7, p_first=0.55), [9, 14, 6, 12])
    batch = make_batch(prompts, 40, model.cfg.max_seq_len, 5, torch.device("cpu"))
    state = prefill(model, batch, Greedy(), 4, None)
    for step in range(10):
        room = (4, 1, 2, 4, 3)[step % 5]  # some steps draft with heads 1..room only
        advance(state, ChainDrafter(threshold=0.3).step(state, room))
        assert_head_caches_match_recomputation(model, state)


# ---- end to end -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drafter", drafters(), ids=[*SHAPES, "dynamic-4x2x2", "dynamic-3x3x3"])
def test_greedy_tree_decoding_equals_greedy_autoregressive(uncertain_model, trained_model, drafter):
    for model, p_first in ((uncertain_model, 0.55), (trained_model, 0.8)):
        prompts = prompts_from(markov_tokens(2000, seed=5, p_first=p_first), [1, 3, 4, 7, 9, 12, 15, 20, 2, 30, 5, 11])
        accepted = assert_greedy_lossless(model, prompts, 40, batch_size=4, tree=drafter)
        assert 0.3 < sum(accepted) / len(accepted) < drafter.depth


def test_tree_accepts_more_than_the_chain(uncertain_model):
    prompts = prompts_from(markov_tokens(2000, seed=5, p_first=0.55), [1, 3, 4, 7, 9, 12, 15, 20, 2, 30, 5, 11])
    chain = speculative_generate(uncertain_model, prompts, 40)
    tree = speculative_generate(uncertain_model, prompts, 40, tree=StaticTree(TreeShape.parse(SHAPES["deep-branching"])))
    assert tree.tokens == chain.tokens
    tau = lambda g: 1 + sum(g.accepted) / len(g.accepted)  # noqa: E731
    assert tau(tree) > tau(chain) + 0.2


def test_chain_shaped_tree_drafts_like_the_chain(uncertain_model):
    """A one-node-per-depth tree runs the heads through tree masks and compaction, yet must draft exactly
    what the chain decoder drafts: the same acceptance, step for step."""
    prompts = prompts_from(markov_tokens(2000, seed=12, p_first=0.55), [8, 13, 21, 5])
    for prompt in prompts:
        chain = speculative_generate(uncertain_model, [prompt], 40)
        tree = speculative_generate(uncertain_model, [prompt], 40, tree=StaticTree(TreeShape.chain(4)))
        assert tree.accepted == chain.accepted and tree.tokens == chain.tokens


def test_tree_stops_at_eos_and_context_end(trained_model):
    drafter = StaticTree(TreeShape.parse(SHAPES["sparse"]))
    prompts = prompts_from(markov_tokens(2000, seed=6), [4, 9, 13])
    free = autoregressive_generate(trained_model.main, prompts, 40).tokens
    eos = free[0][5]
    reference = autoregressive_generate(trained_model.main, prompts, 40, stop_ids={eos}).tokens
    assert speculative_generate(trained_model, prompts, 40, stop_ids={eos}, tree=drafter).tokens == reference
    context = trained_model.cfg.max_seq_len
    long = markov_tokens(context - 6, seed=8).tolist()
    prompts = [long, long[:20]]
    reference = autoregressive_generate(trained_model.main, prompts, 50).tokens
    assert speculative_generate(trained_model, prompts, 50, tree=drafter).tokens == reference


@pytest.mark.parametrize("drafter", [StaticTree(TreeShape.parse(SHAPES["wide"])),
                                     DynamicTree(depth=3, width=2, children=3, nodes=7)], ids=["static", "dynamic"])
def test_tree_sampling_matches_autoregressive_sampling(trained_model, drafter):
    """Distribution of the 2nd and 3rd generated tokens (after a tree step) matches plain sampling."""
    assert_samples_like_the_main_model(trained_model, [5, 17, 3, 9], 3, positions=(1, 2), tree=drafter)


class ChainOnlyDecoder(Decoder):
    supports_tree_attention = False


def test_tree_refuses_backbones_without_tree_attention_and_too_few_heads(trained_model):
    cfg = trained_model.cfg
    model = MTPModel(cfg, backbone=ChainOnlyDecoder(cfg)).eval()
    with pytest.raises(MtpdError, match="tree attention"):
        speculative_generate(model, [[1, 2, 3]], 5, tree=StaticTree(TreeShape.chain(2)))
    assert len(speculative_generate(model, [[1, 2, 3]], 5).tokens[0]) == 5  # the chain still works
    with pytest.raises(MtpdError, match="2 heads draft"):
        speculative_generate(trained_model, [[1, 2, 3]], 5, num_heads=2, tree=StaticTree(TreeShape.chain(3)))
